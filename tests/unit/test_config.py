"""Settings: defaults < YAML file < LORAMERGE_* environment < flags, with clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from loramerge.server.config import load_settings
from loramerge.server.errors import ConfigError

EXAMPLE = Path(__file__).parents[2] / "deploy" / "loramerge.example.yaml"


def test_defaults_listen_on_localhost() -> None:
    settings = load_settings(environ={})
    assert (settings.grpc.host, settings.grpc.port) == ("127.0.0.1", 50051)
    assert (settings.metrics.host, settings.metrics.port) == ("127.0.0.1", 9400)
    assert (settings.merge.method, settings.merge.pico) == ("regmean", False)
    assert (settings.merge.fallback_method, settings.merge.fallback_pico) == ("tsvm", True)
    assert settings.engine.max_lora_rank == 64
    assert settings.cache_dir == Path("~/.cache/loramerge").expanduser()


def test_file_environment_and_flags_in_rising_priority(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("grpc: {port: 6000, host: 0.0.0.0}\nmerge: {method: ties}\n")
    environ = {
        "LORAMERGE_GRPC__PORT": "7000",
        "LORAMERGE_MERGE__HOT_TENANTS": "[acme, globex]",
        "LORAMERGE_ENGINE__MAX_LORAS": "2",
        "OTHER": "ignored",
    }
    settings = load_settings(config, environ, {"grpc": {"port": 8000}})
    assert settings.grpc.port == 8000  # flag beats env beats file
    assert settings.grpc.host == "0.0.0.0"  # file beats default
    assert settings.merge.method == "ties"
    assert settings.merge.hot_tenants == ["acme", "globex"]
    assert settings.engine.max_loras == 2 and settings.engine.resident_adapters == 8


@pytest.mark.parametrize(
    ("yaml_text", "environ", "message"),
    [
        ("grpc: {port: 70000}", {}, "grpc.port"),
        ("engine: {max_lora_rank: 48}", {}, "engine.max_lora_rank"),
        ("engine: {max_loras: 8, max_cpu_loras: 4}", {}, "max_cpu_loras (4) must be ≥ max_loras"),
        ("merge: {colour: blue}", {}, "merge.colour"),
        ("", {"LORAMERGE_METRICS__PORT": "http"}, "metrics.port"),
        ("- just\n- a list", {}, "mapping of settings"),
        ("grpc: {port: [", {}, "not valid YAML"),
    ],
)
def test_invalid_settings_name_the_setting(
    tmp_path: Path, yaml_text: str, environ: dict[str, str], message: str
) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text(yaml_text)
    with pytest.raises(ConfigError) as info:
        load_settings(config, environ)
    assert message in str(info.value)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml"):
        load_settings(tmp_path / "nope.yaml", {})


def test_the_example_file_is_valid_and_documents_every_section() -> None:
    settings = load_settings(EXAMPLE, {})
    text = EXAMPLE.read_text()
    for section in ("grpc:", "metrics:", "engine:", "adapters:", "merge:", "router:", "store:"):
        assert section in text
    assert settings.grpc.host == "127.0.0.1"
