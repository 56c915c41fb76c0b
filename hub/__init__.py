"""mqtt-presence hub: presence engine, service API, stores and the MQTT side."""
