"""The two forms of ``step()`` that tests run alike."""


def step_in_form(opt, closure, form: str):
    """``opt.step(closure)`` (``form="one_phase"``), or the caller's forward and backward and then
    ``opt.step(closure, loss=loss)`` (``"two_phase"``); the step's return value."""
    if form == "one_phase":
        return opt.step(closure)
    loss = closure()
    loss.backward()
    return opt.step(closure, loss=loss.detach())
