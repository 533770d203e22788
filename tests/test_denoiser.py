"""The Denoiser: guidance mixed in one place, in the adapter's batch order; embedded guidance
passed to the network through the adapter's hook; x0 from the prediction type."""

from __future__ import annotations

import pytest
import torch

from distill.denoiser import Denoiser
from distill.schedules import DDPMSchedule


class StubAdapter:
    """output = x_t * c, where c is the conditioning's per-sample value (null: 0)."""

    prediction_type = "epsilon"
    schedule = DDPMSchedule(torch.linspace(0.999, 0.01, 1000))

    def __init__(self, guidance, null_first=True):
        self.guidance, self.null_first, self.calls = guidance, null_first, []

    def output(self, network, x_t, t, cond):
        self.calls.append({"batch": len(x_t), "t": t.clone(), **{k: v.clone() for k, v in cond.items()}})
        return network(x_t) * cond["c"].view(-1, 1, 1, 1)

    def null_condition(self, cond):
        return {"c": torch.zeros_like(cond["c"])}

    def with_guidance(self, cond, scale):
        return {**cond, "guidance": torch.full_like(cond["c"], scale)}


X_T, T, COND = torch.randn(2, 1, 2, 2, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 500]), {"c": torch.tensor([2.0, 3.0])}
NETWORK = torch.nn.Identity()


@pytest.mark.parametrize("null_first", [True, False])
def test_cfg_is_one_batched_call_in_the_adapters_order(null_first):
    adapter = StubAdapter("cfg", null_first)
    out = Denoiser(adapter, NETWORK, 4.0).output(X_T, T, COND)
    torch.testing.assert_close(out, 4.0 * X_T * COND["c"].view(-1, 1, 1, 1))  # null + 4 (cond - null), null = 0
    (call,) = adapter.calls
    expected = torch.tensor([0.0, 0.0, 2.0, 3.0]) if null_first else torch.tensor([2.0, 3.0, 0.0, 0.0])
    assert call["batch"] == 4 and torch.equal(call["c"], expected) and torch.equal(call["t"], torch.cat([T, T]))


def test_scale_one_and_unguidable_networks_call_once_unguided():
    for guidance, scale in (("cfg", 1.0), (None, 5.0)):
        adapter = StubAdapter(guidance)
        torch.testing.assert_close(Denoiser(adapter, NETWORK, scale).output(X_T, T, COND), X_T * COND["c"].view(-1, 1, 1, 1))
        assert [c["batch"] for c in adapter.calls] == [2]


@pytest.mark.parametrize("scale", [1.0, 3.5])
def test_embedded_guidance_is_a_network_input_at_every_scale(scale):
    adapter = StubAdapter("embedded")
    Denoiser(adapter, NETWORK, scale).output(X_T, T, COND)
    (call,) = adapter.calls
    assert call["batch"] == 2 and torch.equal(call["guidance"], torch.full((2,), scale)) and torch.equal(call["c"], COND["c"])


def test_x0_reads_the_output_in_the_prediction_type():
    adapter = StubAdapter("cfg")
    out = X_T * COND["c"].view(-1, 1, 1, 1)
    torch.testing.assert_close(Denoiser(adapter, NETWORK).x0(X_T, T, COND), adapter.schedule.to_x0(out, X_T, T, "epsilon"))
    student = Denoiser(adapter, NETWORK, prediction_type="sample")  # a student with its own parametrization
    assert student.prediction_type == "sample" and Denoiser(adapter, NETWORK).prediction_type == "epsilon"
    torch.testing.assert_close(student.x0(X_T, T, COND), out)


def test_an_unknown_guidance_kind_is_refused():
    with pytest.raises(ValueError, match="unknown guidance kind 'distilled'"):
        Denoiser(StubAdapter("distilled"), NETWORK)
