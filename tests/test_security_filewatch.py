"""runtime.wire.filewatch.FileWatch, the one reload rule behind server certificates, client
credentials, the tokens file and the CRL: a changed file is loaded again (at most once per interval),
a bad edit keeps the working value and is retried until it loads, SIGHUP (request_reload) loads
again even when the files look unchanged."""

from __future__ import annotations

import logging
import os

import pytest

from runtime.daemon.revocation import Revocations
from runtime.tools import pki
from runtime.wire import filewatch
from runtime.wire.filewatch import FileWatch
from tests.security_site import site  # noqa: F401 (fixture)

pytestmark = pytest.mark.timeout(60)


def parse(path):
    def load() -> int:
        return int(path.read_text())  # ValueError for a bad edit

    return load


def test_a_change_is_loaded_a_bad_edit_keeps_the_value_and_is_retried(tmp_path, caplog):
    f = tmp_path / "n"
    f.write_text("1")
    watch = FileWatch([str(f)], parse(f), "number", interval=0.0)
    assert watch.value == 1 and not watch.check()  # unchanged: nothing loaded
    f.write_text("22")
    assert watch.check() and watch.value == 22
    with caplog.at_level(logging.ERROR, "runtime.wire.filewatch"):
        f.write_text("not a number")
        assert not watch.check() and not watch.check()
    assert watch.value == 22
    assert sum("cannot be loaded" in r.message for r in caplog.records) == 1  # logged once per change
    f.write_text("333")
    assert watch.check() and watch.value == 333 and watch.reloads == 2


def test_a_missing_file_keeps_the_value_until_it_is_back(tmp_path):
    f = tmp_path / "n"
    f.write_text("5")
    watch = FileWatch([str(f)], parse(f), "number", interval=0.0)
    f.unlink()
    assert not watch.check() and watch.value == 5
    f.write_text("6")
    assert watch.check() and watch.value == 6


def test_files_are_looked_at_once_per_interval_unless_a_reload_is_requested(tmp_path):
    f = tmp_path / "n"
    f.write_text("1")
    watch = FileWatch([str(f)], parse(f), "number", interval=3600.0)
    f.write_text("22")
    assert not watch.check() and watch.value == 1  # within the interval: not looked at
    filewatch.request_reload()
    assert watch.check() and watch.value == 22


def test_a_requested_reload_loads_files_that_look_unchanged(tmp_path):
    f = tmp_path / "n"
    f.write_text("1")
    watch = FileWatch([str(f)], parse(f), "number", interval=0.0)
    st = os.stat(f)
    f.write_text("7")  # same size, its mtime put back: no change to notice
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert not watch.check() and watch.value == 1
    filewatch.request_reload()
    assert watch.check() and watch.value == 7
    assert not watch.check()  # once


def test_sighup_rereads_a_crl_whose_file_looks_unchanged(site):  # noqa: F811
    ca = pki.read(site, "ca")
    crl = site / "crl.pem"
    pki.revoke(ca, crl, [(site / "agent-a2.pem").read_bytes()])
    revocations = Revocations(str(crl), str(site / "ca.pem"))
    serial = pki.serial_of((site / "agent-a1.pem").read_bytes())
    st = os.stat(crl)
    for _ in range(50):  # a CRL of the same size revoking a1 instead, its mtime put back
        data = pki.make_crl(ca, {serial})
        if len(data) == st.st_size:
            break
    else:
        pytest.skip("no CRL of the same size in 50 tries")
    crl.write_bytes(data)
    os.utime(crl, ns=(st.st_atime_ns, st.st_mtime_ns))
    filewatch.request_reload()
    revocations.refresh()
    assert serial in revocations.serials
