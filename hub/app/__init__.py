"""The presence service and what runs it: the API, the clock task, flushes, rate limiting,
chat commands, and the one factory that wires stores and MQTT to it."""
