import logging

import pytest
import torch

from lowbit.recipes.optim import build_optimizer


@pytest.mark.parametrize("name", ["adamw_torch", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit"])
def test_each_optimizer_takes_a_step_on_cpu(name, caplog):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(128, 64))  # >= 4096 elements: bitsandbytes keeps 8-bit state
    frozen = torch.nn.Parameter(torch.randn(4), requires_grad=False)
    with caplog.at_level(logging.WARNING, logger="lowbit"):
        opt = build_optimizer(name, [p, frozen], lr=1e-2, weight_decay=0.0)
    before = p.detach().clone()
    (p ** 2).sum().backward()
    opt.step()
    assert not torch.equal(p.detach(), before)
    assert (p.detach() ** 2).sum() < (before ** 2).sum()  # moved downhill
    paged_notes = [r for r in caplog.records if "paging needs CUDA" in r.getMessage()]
    assert len(paged_notes) == (1 if name.startswith("paged_") and not torch.cuda.is_available() else 0)
