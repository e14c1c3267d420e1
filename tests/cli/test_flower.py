"""demix.cli.flower: with API keys configured, Flower asks for its own login, or listens on
127.0.0.1 only. A real Flower, started as `demix up` and `demix flower` start it."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import typing as tp
from pathlib import Path

import pytest
import requests

from demix.cli.argv import flower_argv
from demix.cli.flower import flower_access_note, flower_address, flower_authorization, flower_environment
from demix.cli.processes import popen_child, stop_process
from demix.cli.redis_server import free_port
from demix.config import Settings
from tests.support.demix_up import DEMIX
from tests.support.waiting import wait_for

LOGIN = "operator:s3cret-pass"
PRIVATE_PAGES = ("/tasks/datatable?draw=1&start=0&length=10&order[0][column]=0&columns[0][data]=name",
                 "/api/tasks")
"""Flower pages listing every job's (task's) id: the tasks page's table, and the API."""


@contextlib.contextmanager
def running_flower(settings: Settings) -> tp.Iterator[subprocess.Popen]:
    """Flower started with `demix up`'s command and environment, until it answers /healthcheck."""
    process = popen_child(flower_argv(settings), env=flower_environment(settings, os.environ),
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _answers(f"http://127.0.0.1:{settings.flower_port}/healthcheck"),
                 "Flower to answer /healthcheck", timeout=60)
        yield process
    finally:
        stop_process(process, timeout=5)


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.ConnectionError:
        return False


def listening_addresses(port: int) -> set[str]:
    """The local IPv4 addresses with a socket listening on `port` (from /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        address, local_port = local.split(":")
        if state == "0A" and int(local_port, 16) == port:
            found.add(".".join(str(int(address[i:i + 2], 16)) for i in (6, 4, 2, 0)))
    return found


@pytest.mark.processes
def test_with_api_keys_and_a_login_flower_asks_for_it_on_every_page_listing_jobs(redis_server, settings):
    keyed = dataclasses.replace(settings, api_keys="k1", flower_auth=LOGIN, host="127.0.0.1",
                                flower_port=free_port())
    base = f"http://127.0.0.1:{keyed.flower_port}"
    with running_flower(keyed) as process:
        for path in PRIVATE_PAGES:
            assert requests.get(base + path, timeout=10).status_code == 401, path
            assert requests.get(base + path, timeout=10, auth=("operator", "wrong")).status_code == 401, path
            assert requests.get(base + path, timeout=10, auth=tuple(LOGIN.split(":"))).status_code == 200, path
        # `demix up`'s readiness check still gets its answer, and the login is not on the command line.
        assert requests.get(base + "/healthcheck", timeout=10, headers=flower_authorization(keyed)).text == "OK"
        assert "s3cret" not in " ".join(flower_argv(keyed))
        assert b"s3cret" not in Path(f"/proc/{process.pid}/cmdline").read_bytes()


@pytest.mark.processes
def test_with_api_keys_and_no_login_flower_listens_on_loopback_only(redis_server, settings):
    # DEMIX_HOST 127.0.0.2 stands for a public address: another loopback one, so nothing leaves the machine.
    keyed = dataclasses.replace(settings, api_keys="k1", flower_auth="", host="127.0.0.2", flower_port=free_port())
    with running_flower(keyed):
        assert listening_addresses(keyed.flower_port) == {"127.0.0.1"}
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.2:{keyed.flower_port}{PRIVATE_PAGES[0]}", timeout=10)


def test_the_address_and_the_note_say_where_flower_listens():
    open_service = Settings(host="0.0.0.0")
    assert flower_address(open_service) == "0.0.0.0" and flower_access_note(open_service) == ""
    keyed = Settings(host="0.0.0.0", api_keys="k1")
    assert flower_address(keyed) == "127.0.0.1"
    assert "127.0.0.1 only" in flower_access_note(keyed) and "DEMIX_FLOWER_AUTH" in flower_access_note(keyed)
    with_login = Settings(host="0.0.0.0", api_keys="k1", flower_auth=LOGIN)
    assert flower_address(with_login) == "0.0.0.0"
    assert "login" in flower_access_note(with_login) and "s3cret" not in flower_access_note(with_login)
    assert flower_environment(with_login, {"PATH": "/bin"}) == {"PATH": "/bin", "FLOWER_BASIC_AUTH": LOGIN}
    assert "FLOWER_BASIC_AUTH" not in flower_environment(keyed, {"PATH": "/bin"})


@pytest.mark.parametrize("login", ["operator", ":pa55", "operator:", "a:b,nouser"])
def test_a_login_that_is_not_user_colon_password_is_refused_without_repeating_it(login):
    with pytest.raises(ValueError, match="DEMIX_FLOWER_AUTH") as refused:
        flower_environment(Settings(flower_auth=login), {})
    assert login not in str(refused.value)


def test_demix_flower_refuses_a_malformed_login_before_starting_flower(monkeypatch, capsys):
    from demix.cli.main import main

    monkeypatch.setenv("DEMIX_FLOWER_AUTH", "only-a-password")
    assert main(["flower"]) == 2
    assert "DEMIX_FLOWER_AUTH: login 1 is not user:password" in capsys.readouterr().err


@pytest.mark.processes
def test_demix_flower_serves_flower_behind_the_login(redis_server, settings):
    port = free_port()
    env = {**os.environ, "DEMIX_API_KEYS": "k1", "DEMIX_FLOWER_AUTH": LOGIN, "DEMIX_FLOWER_PORT": str(port),
           "DEMIX_HOST": "127.0.0.1"}
    process = popen_child([DEMIX, "flower"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _answers(f"http://127.0.0.1:{port}/healthcheck"), "demix flower to answer", timeout=60)
        assert requests.get(f"http://127.0.0.1:{port}/api/tasks", timeout=10).status_code == 401
        assert requests.get(f"http://127.0.0.1:{port}/api/tasks", timeout=10,
                            auth=tuple(LOGIN.split(":"))).status_code == 200
    finally:
        stop_process(process, timeout=5)
