"""org.freedesktop.LogControl1 at /org/freedesktop/LogControl1, as systemd's
daemons serve it: what ``systemctl service-log-level`` and
``service-log-target`` change, at once.

LogLevel is a syslog level name (emerg ... debug); LogTarget is where the
lines go: they always go to stderr (the journal, under systemd), with
syslog prefixes ("<6>") for every target but "console", and nowhere for
"null".  Who may set them is the bus policy's affair, as with systemd
(systemd/org.freedesktop.*.conf let only root call Set)."""

from __future__ import annotations

import logging

from sdbus import DbusInterfaceCommonAsync, DbusPropertyEmitsChangeFlag, dbus_property_async
from sdbus.dbus_exceptions import DbusInvalidArgsError

from imagepool import daemon

PATH = "/org/freedesktop/LogControl1"
INTERFACE = "org.freedesktop.LogControl1"

LEVELS = ("emerg", "alert", "crit", "err", "warning", "notice", "info", "debug")
TARGETS = ("console", "console-prefixed", "kmsg", "journal", "journal-or-kmsg", "syslog", "syslog-or-kmsg",
           "auto", "null")


class LogControl(DbusInterfaceCommonAsync, interface_name=INTERFACE):
    def __init__(self, identifier: str) -> None:
        super().__init__()
        self.identifier = identifier

    @dbus_property_async("s", flags=DbusPropertyEmitsChangeFlag, property_name="LogLevel")
    def log_level(self) -> str:
        return LEVELS[daemon.get_log_level()]

    @log_level.setter
    def _set_log_level(self, value: str) -> None:
        if value not in LEVELS:
            raise DbusInvalidArgsError(f"Invalid log level '{value}'")
        daemon.set_log_level(LEVELS.index(value))
        logging.getLogger(__name__).info("Log level set to %s.", value)

    @dbus_property_async("s", flags=DbusPropertyEmitsChangeFlag, property_name="LogTarget")
    def log_target(self) -> str:
        return daemon.get_log_target()

    @log_target.setter
    def _set_log_target(self, value: str) -> None:
        if value not in TARGETS:
            raise DbusInvalidArgsError(f"Invalid log target '{value}'")
        daemon.set_log_target(value)

    @dbus_property_async("s", property_name="SyslogIdentifier")
    def syslog_identifier(self) -> str:
        return self.identifier
