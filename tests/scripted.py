"""For tests whose two-phase closure returns scripted losses, not the model's loss at the weights."""

from __future__ import annotations


def scripted_losses(opt):
    """Mark done the once-per-optimizer check that ``loss=`` is the closure's loss at w0 (one forward at
    w0 at the first two-phase search that judges trials against ``loss=``,
    ``FusedSaLSa._refuse_a_loss_not_the_closures``): a scripted closure is not the loss= at w0 by design
    (it rejects a trial by returning loss + 1e3, or fails the test when called), and the test reads each
    of its calls as one of the search's trials. Returns ``opt``."""
    opt._loss_checked = True
    return opt
