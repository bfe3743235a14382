"""Fixtures: servers per module and engine, sessions, unique keys (see support.py)."""
import itertools
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from support import (ENGINES, MEMCACHED_BIN, PERSISTENT_ENGINES, PROXY_ENGINES,  # noqa: E402
                     TARGET, MemcachedServer, make_server)


def pytest_configure(config):
    config.addinivalue_line("markers", "memtool_only: needs memtool itself (skipped when "
                            "MEMTOOL_TEST_TARGET=memcached)")
    config.addinivalue_line("markers", "proxied: the module's server fixtures also run "
                            "through `memtool.py proxy` (in front of memtool and memcached)")
    config.addinivalue_line("markers", "server_only: a server's own behaviour, not a "
                            "proxy's (stats, -c, shutdown, ...): not run through the proxy")


def pytest_generate_tests(metafunc):
    if "engine" in metafunc.fixturenames:
        proxied = metafunc.definition.get_closest_marker("proxied") and TARGET == "memtool"
        metafunc.parametrize("engine", ENGINES + (PROXY_ENGINES if proxied else []),
                             indirect=True, scope="module")


def pytest_collection_modifyitems(config, items):
    if TARGET == "memcached":
        skip = pytest.mark.skip(reason="memtool-specific; MEMTOOL_TEST_TARGET=memcached")
        for item in items:
            if item.get_closest_marker("memtool_only"):
                item.add_marker(skip)
    skip_proxy = pytest.mark.skip(reason="a server's own behaviour, not a proxy's")
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec and str(callspec.params.get("engine", "")).startswith("proxy-") \
                and item.get_closest_marker("server_only"):
            item.add_marker(skip_proxy)


def pytest_report_header(config):
    return "memtool target: %s; engines: %s; memcached: %s" % (
        TARGET, ", ".join(ENGINES), MEMCACHED_BIN or "absent")


@pytest.fixture(scope="module")
def engine(request):
    """The server kind under test: every engine (pytest_generate_tests), and the
    proxied ones for modules marked `proxied`."""
    return request.param


@pytest.fixture(scope="module", params=PERSISTENT_ENGINES or ["memcached"])
def persistent_engine(request):
    return request.param


@pytest.fixture(scope="module")
def server(engine, tmp_path_factory):
    """One server per module and engine; tests keep to their own keys."""
    srv = make_server(tmp_path_factory.mktemp("srv-" + engine), engine)
    srv.start()
    yield srv
    srv.close()


@pytest.fixture
def server_factory(engine, tmp_path):
    """Fresh servers with options, for tests that need global state of their own."""
    made = []

    def factory(**options):
        srv = make_server(tmp_path / ("srv%d" % len(made)), engine, **options)
        made.append(srv)
        return srv.start()

    yield factory
    for srv in made:
        srv.close()


@pytest.fixture
def session(server):
    s = server.session()
    yield s
    s.close()


@pytest.fixture(scope="module")
def memcached(tmp_path_factory):
    if not MEMCACHED_BIN:
        pytest.skip("memcached binary not installed (apt-get install memcached)")
    srv = MemcachedServer(tmp_path_factory.mktemp("memcached"))
    srv.start()
    yield srv
    srv.close()


_key_counter = itertools.count()


@pytest.fixture
def kp():
    """A key prefix no other test uses, so tests can share a server."""
    return b"t%d." % next(_key_counter)
