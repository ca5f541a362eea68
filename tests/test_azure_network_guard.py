"""The suite-wide network guard (tests/conftest.py): loopback is allowed, anything else fails the test."""

from __future__ import annotations

import socket

import pytest
from conftest import NetworkBlocked


def test_a_connection_to_a_public_address_fails_the_test():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock, pytest.raises(NetworkBlocked):
        sock.connect(("20.50.2.1", 443))  # an Azure address: never contacted, the guard raises before connecting


def test_loopback_stays_open():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as client:
            client.connect(server.getsockname())
