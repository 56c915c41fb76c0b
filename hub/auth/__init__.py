"""Who may use the hub's MQTT broker, and for what: accounts, topic grants, the access policy.

Why this package: presence is personal data and its topics decide state. Without it anyone who
reaches the broker can set another user's status (publish ``P/devices/alice/...``), read who is
home, or forge the hub's own retained topics. The rules are written once and used three ways:
by the embedded broker (as amqtt plugins, :mod:`.plugins`), by the hub as a second check on
every message handed to it (:mod:`.policy`), and as the ``password_file``/``acl_file`` a
Mosquitto broker reads (:mod:`.mosquitto`).

* :mod:`.accounts`: the three roles, password hashes (Mosquitto's ``$7$``) and
  ``credentials.json``;
* :mod:`.grants`: which topic filters an account may publish to and read
  (matching itself is :mod:`hub.protocol.matching`);
* :mod:`.policy`: the verdict on a CONNECT and the check on every message, with counters.
"""

from hub.auth.accounts import (
    DEFAULT_HUB_ACCOUNT,
    PBKDF2_ITERATIONS,
    Account,
    CredentialsError,
    CredentialStore,
    Role,
    check_hash,
    default_credentials_path,
    device_username,
    generate_password,
    hash_password,
    verify_password,
    write_private_file,
)
from hub.auth.grants import OPEN_GRANT, Grant, grant_for
from hub.auth.mosquitto import mosquitto_acl_file, mosquitto_password_file
from hub.auth.policy import AccessPolicy, Verdict, is_loopback, listen_policy_error

__all__ = [
    "DEFAULT_HUB_ACCOUNT",
    "OPEN_GRANT",
    "PBKDF2_ITERATIONS",
    "AccessPolicy",
    "Account",
    "CredentialStore",
    "CredentialsError",
    "Grant",
    "Role",
    "Verdict",
    "check_hash",
    "default_credentials_path",
    "device_username",
    "generate_password",
    "grant_for",
    "hash_password",
    "is_loopback",
    "listen_policy_error",
    "mosquitto_acl_file",
    "mosquitto_password_file",
    "verify_password",
    "write_private_file",
]
