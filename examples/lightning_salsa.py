"""FusedSaLSa in PyTorch Lightning: a manual-optimization LightningModule.

Why manual optimization: in automatic optimization the closure Lightning hands to
``optimizer.step`` runs ``training_step`` *and* the backward (plus ``zero_grad``,
clipping and hooks) every time it is called; a line search calls its loss function once
per trial, so each trial would run a backward and overwrite the gradients that define
the search direction. With gradient accumulation the closure covers only the last
micro-batch, and under ``16-mixed`` Lightning calls the closure itself and steps without
one. In manual optimization the module runs the forward and ``manual_backward`` once and
gives the optimizer a forward-only loss function (the two-phase step), bound before the
step: under ``16-mixed`` with a GradScaler, Lightning's precision plugin calls ``step``
without the closure it was handed (``step(closure=..., loss=...)`` fails there):

    opt.mark_forward()                      # dropout: trials replay this forward's masks
    loss = self.loss(batch); self.manual_backward(loss)
    opt.bind_closure(lambda: self.loss(batch), loss=loss.detach())
    opt.step()

``FusedSaLSa(..., model=self.model)`` keeps BatchNorm's running statistics as the training
forward left them (the trial forwards would update them too). Without ``mark_forward()`` the
step is still safe: it spends one more forward per search, at the current weights, to compare
like with like.

Lightning's precision plugin wraps the closure it hands to the step: in this bound form the
``on_before_optimizer_step`` hooks run once per step, however many trials the search makes (with
``step(closure=..., loss=...)`` they would run at each trial). Trial forwards run inside
``training_step``, so under ``bf16-mixed`` they are autocast like the training forward.

Needs Lightning, which the ``examples`` extra leaves out (the demo does not use it): ``pip install lightning``
(the ``test`` extra has it). Run: ``python examples/lightning_salsa.py --precision bf16-mixed --steps 20``
(``32-true``, ``bf16-mixed`` or ``16-mixed``: with a GradScaler on a GPU; on the CPU Lightning 2.6 runs
``bf16-mixed`` in its place, and says so)
"""

from __future__ import annotations

import argparse
from typing import Callable, Optional

try:
    import lightning as L
except ModuleNotFoundError as missing:  # the examples extra leaves it out: say how to get it
    raise SystemExit(f"examples/lightning_salsa.py needs Lightning ({missing}): pip install lightning") from None
import torch

from salsa_fused import FusedSaLSa

if __package__:  # imported as examples.lightning_salsa (the tests)
    from .gpt import GPT, ByteBatches, GPTConfig, load_stdlib_corpus
else:  # run as a script (python examples/lightning_salsa.py): its own directory is on sys.path
    from gpt import GPT, ByteBatches, GPTConfig, load_stdlib_corpus


class SaLSaModule(L.LightningModule):
    """Trains ``model`` with FusedSaLSa; ``loss_fn(model, batch)`` returns the mean loss.

    ``schedule(optimizer)``, when given, returns a ``torch.optim.lr_scheduler`` stepped once
    per optimizer step (``lr`` multiplies the level the search finds).
    """

    def __init__(self, model: torch.nn.Module, loss_fn: Callable, salsa_kwargs: Optional[dict] = None,
                 schedule: Optional[Callable] = None):
        super().__init__()
        self.automatic_optimization = False
        self.model = model
        self.loss_fn = loss_fn
        self.salsa_kwargs = dict(salsa_kwargs or {})
        self.schedule = schedule

    def configure_optimizers(self):
        # model=: the trial forwards leave BatchNorm's running statistics as the training forward did
        optimizer = FusedSaLSa(self.model.parameters(), model=self.model, **self.salsa_kwargs)
        if self.schedule is None:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": self.schedule(optimizer),
                                                         "interval": "step"}}

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        opt.zero_grad()
        opt.mark_forward()  # the trials replay this forward's random state: its dropout masks
        loss = self.loss_fn(self.model, batch)
        self.manual_backward(loss)
        opt.bind_closure(lambda: self.loss_fn(self.model, batch), loss=loss.detach())
        opt.step()  # bound, not passed: a 16-mixed GradScaler plugin steps without the closure given
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            scheduler.step()
        salsa = opt.optimizer
        self.log_dict({"train_loss": loss.detach(), "step_size": salsa.step_size,
                       "search_interval": salsa.search_interval,
                       "forward_evals": float(salsa.num_forward_evals)}, prog_bar=True)
        return loss.detach()


def gpt_loss(model, batch):
    x, y = batch
    return model(x, y)[1]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed", "16-mixed"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--block", type=int, default=64, help="bytes per sequence (at most 4096 in this example)")
    args = parser.parse_args(argv)
    for name, most in (("steps", None), ("batch", None), ("block", 4096)):
        value = getattr(args, name)
        if value < 1 or (most is not None and value > most):
            parser.error(f"--{name} must be >= 1" + (f" and <= {most}" if most else "") + f", got {value}")

    torch.manual_seed(0)
    data = ByteBatches(load_stdlib_corpus(max_bytes=2_000_000), args.block)
    generator = torch.Generator().manual_seed(0)
    batches = [data.get("train", args.batch, generator) for _ in range(args.steps)]
    model = GPT(GPTConfig(block_size=args.block, n_layer=2, n_head=2, n_embd=64))
    module = SaLSaModule(model, gpt_loss)
    trainer = L.Trainer(max_steps=args.steps, accelerator="auto", precision=args.precision,
                        logger=False, enable_checkpointing=False, log_every_n_steps=1)
    trainer.fit(module, train_dataloaders=torch.utils.data.DataLoader(batches, batch_size=None))
    salsa = trainer.optimizers[0]
    print(f"steps {salsa.search_state.step}  step size {salsa.step_size:.3e}  "
          f"searches {salsa.num_searches}  forward evals {salsa.num_forward_evals}")


if __name__ == "__main__":
    main()
