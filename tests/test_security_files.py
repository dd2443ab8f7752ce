"""Files read at start-up (security audit): a Transfer Layer manifest (runtime.transfer.artifact) and a
--config TOML file (runtime.contracts.config) are checked against their caps before they are read. (The weights need no cap of their own: safetensors maps the
file and checks its header; a tensor the TL has no place for is refused from its name and shape,
its bytes never read: a 512 MiB extra tensor grew the peak RSS by nothing, 2026-12-04.)"""

from __future__ import annotations

import json

import pytest

from runtime.contracts.errors import TooLarge
from runtime.transfer.artifact import BUNDLED_DIR, MAX_MANIFEST_BYTES, read_manifest

pytestmark = pytest.mark.timeout(60)

TL = "tl-d1a2152e9a29"  # the bundled efficientnet_lite0 TL


def test_a_manifest_over_its_cap_is_refused_unread(tmp_path):
    path = tmp_path / f"{TL}.json"
    manifest = json.loads((BUNDLED_DIR / f"{TL}.json").read_text())
    manifest["notes"] = "n" * MAX_MANIFEST_BYTES
    path.write_text(json.dumps(manifest))
    with pytest.raises(TooLarge, match="at most"):
        read_manifest(path)


def test_a_deeply_nested_manifest_is_invalid_input(tmp_path):
    from runtime.contracts.errors import InvalidInput

    path = tmp_path / f"{TL}.json"
    path.write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(InvalidInput, match="not valid JSON"):
        read_manifest(path)


def test_a_config_file_over_its_cap_is_refused_unread(tmp_path):
    """--config (TOML) is read only up to MAX_CONFIG_BYTES; a missing one still says it does not exist."""
    from runtime.contracts.config import MAX_CONFIG_BYTES, load_config
    from runtime.contracts.errors import InvalidInput
    from runtime.worker.config import WorkerConfig

    big = tmp_path / "big.toml"
    big.write_text("[worker]\n" + "# padding\n" * (MAX_CONFIG_BYTES // 10 + 1))
    with pytest.raises(TooLarge, match="at most"):
        load_config(WorkerConfig, "worker", config_file=str(big), env={})
    with pytest.raises(InvalidInput, match="does not exist"):
        load_config(WorkerConfig, "worker", config_file=str(tmp_path / "none.toml"), env={})
    ok = tmp_path / "ok.toml"
    ok.write_text("[worker]\nmax_batch = 4\n")
    assert load_config(WorkerConfig, "worker", config_file=str(ok), env={}).max_batch == 4
