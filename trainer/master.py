"""fp32 master weights for a model whose parameters are bf16 (one process; FSDP keeps fp32 parameters itself).

At a learning rate of 2e-5 most AdamW updates of a bf16 weight are smaller than half its last bit and round
away. Here the optimizer updates fp32 copies instead, and the model computes with the copies rounded to bf16.

Invariants:
- Each bf16 parameter's gradient is added into its master's fp32 `.grad` as soon as autograd has accumulated
  it (a post-accumulate hook) and is then freed: gradient accumulation over micro-batches sums in fp32.
- The optimizer and gradient clipping see only the masters.
- After every optimizer step `sync` writes the masters, rounded, into the model: the weights a checkpoint
  publishes are the rounded masters, and a resume restores the masters themselves (saved with the
  optimizer state), so resuming is exact.

Cost: 4 more bytes per parameter for the master and 2 for its fp32 gradient beside today's bf16 weights and
fp32 Adam moments (1.5B parameters: about +14 GB); a copy and a cast per step.
"""

from __future__ import annotations

import torch


class MasterWeights:
    def __init__(self, model: torch.nn.Module):
        self.model_params = [p for p in model.parameters() if p.requires_grad]
        self.params = [p.detach().float().requires_grad_() for p in self.model_params]
        """What the optimizer updates, in the order of model.parameters()."""
        for param, master in zip(self.model_params, self.params, strict=True):
            param.register_post_accumulate_grad_hook(self._hook(master))

    @staticmethod
    def _hook(master: torch.Tensor):
        def move_grad(param: torch.Tensor) -> None:
            if master.grad is None:
                master.grad = param.grad.float()
            else:
                master.grad.add_(param.grad)
            param.grad = None

        return move_grad

    @torch.no_grad()
    def sync(self) -> None:
        """Round the masters into the model (after each optimizer step, and after a resume)."""
        torch._foreach_copy_(self.model_params, self.params)

    @torch.no_grad()
    def load(self, saved: list[torch.Tensor]) -> None:
        if [t.shape for t in saved] != [p.shape for p in self.params]:
            raise ValueError("the saved master weights do not match this model's parameters")
        torch._foreach_copy_(self.params, [t.to(self.params[0].device) for t in saved])
        self.sync()
