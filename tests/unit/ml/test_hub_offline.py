"""An offline start probes the model hub once and then stays offline (no per-file retries)."""

from __future__ import annotations

import pytest
from huggingface_hub import constants

from app.ml import model


@pytest.fixture
def fresh_probe(monkeypatch):
    monkeypatch.setattr(model, "_hub_reachable", None)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "")
    probes: list[tuple[str, int]] = []
    return probes


def test_unreachable_hub_switches_the_process_offline_once(fresh_probe, monkeypatch):
    def unreachable(address, _timeout):
        fresh_probe.append(address)
        return False

    monkeypatch.setattr(model, "_can_connect", unreachable)
    assert model.ensure_hub_or_offline() is False
    assert constants.HF_HUB_OFFLINE is True and constants.is_offline_mode()
    assert model.ensure_hub_or_offline() is False
    assert len(fresh_probe) == 1  # decided once per process


@pytest.mark.usefixtures("fresh_probe")
def test_reachable_hub_stays_online(monkeypatch):
    monkeypatch.setattr(model, "_can_connect", lambda _address, _timeout: True)
    assert model.ensure_hub_or_offline() is True
    assert constants.HF_HUB_OFFLINE is False


@pytest.mark.usefixtures("fresh_probe")
def test_already_offline_needs_no_probe(monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(model, "_can_connect", lambda *_a: pytest.fail("probed"))
    assert model.ensure_hub_or_offline() is False


@pytest.mark.usefixtures("fresh_probe")
def test_a_tag_without_network_fails_fast_to_the_fallback(monkeypatch):
    monkeypatch.setattr(model, "_can_connect", lambda _address, _timeout: False)
    with pytest.raises(model.ModelUnavailableError):
        model.load_clip("ViT-B-32", "openai", "cpu", None)
    assert constants.HF_HUB_OFFLINE is True
