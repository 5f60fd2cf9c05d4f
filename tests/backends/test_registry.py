"""Backends by name: chosen and checked once, at construction; new ones registered from outside."""

import types
import warnings

import pytest
import torch

from salsa_fused import FusedSaLSa
from salsa_fused import _ext, backends
from salsa_fused.backends import cpp_backend, torch_backend, triton_backend
from salsa_fused.backends.base import Backend


def test_backends_in_the_registry_have_every_pass():
    for name in backends.REGISTRY:
        assert isinstance(backends.load(name), Backend), name


def test_triton_on_cpu_without_the_interpreter_fails_at_construction(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    w = torch.zeros(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="Triton needs CUDA tensors, or TRITON_INTERPRET=1"):
        FusedSaLSa([w], backend="triton")
    assert FusedSaLSa([w]).backend is not triton_backend  # "auto" passes it over


@pytest.mark.parametrize("version, refused", [("3.0.0", True), ("3.1.0", True), ("3.2.0", False), ("3.10.1", False)])
def test_an_interpreter_that_would_step_nothing_is_refused_at_construction(monkeypatch, version, refused):
    """Triton 3.0/3.1's interpreter leaves the kernels' table-loaded pointers unfollowed (a step there moved no
    weight, silently, with torch 2.4.1's Triton 3.0): refused with the version it needs, "auto" passes it over."""
    if triton_backend._IMPORT_ERROR is not None:
        pytest.skip("needs triton")  # turned into a failure by conftest: the test dependency is missing
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(triton_backend.triton, "__version__", version)
    w = torch.zeros(3, requires_grad=True)
    assert triton_backend.is_available() is not refused
    if refused:
        with pytest.raises(RuntimeError, match=rf"Triton {version}'s CPU interpreter .* needs Triton >= 3\.2"):
            FusedSaLSa([w], backend="triton")
        assert FusedSaLSa([w]).backend is not triton_backend
    else:
        assert FusedSaLSa([w], backend="triton").backend is triton_backend


def test_triton_missing_fails_at_construction(monkeypatch):
    monkeypatch.setattr(triton_backend, "_IMPORT_ERROR", ImportError("No module named 'triton'"))
    with pytest.raises(RuntimeError, match="needs the `triton` package"):
        FusedSaLSa([torch.zeros(3, requires_grad=True)], backend="triton")


def test_auto_picks_cpp_for_cpu_tensors_when_it_is_built():
    assert backends.usable("cpp", torch.device("cpu")), f"the C++ extension is not built: {_ext.build_hint()}"
    assert FusedSaLSa([torch.zeros(3, requires_grad=True)]).backend is cpp_backend
    assert FusedSaLSa([torch.zeros(3, requires_grad=True)], backend="torch").backend is torch_backend


def test_triton_that_lacks_numpy_names_numpy(monkeypatch):
    """Triton's CPU interpreter imports numpy, which neither Triton nor the [triton] extra installs: the
    refusal blamed Triton."""
    monkeypatch.setattr(triton_backend, "_IMPORT_ERROR", ModuleNotFoundError("No module named 'numpy'", name="numpy"))
    with pytest.raises(RuntimeError, match="the `triton` package does not import here, for want of `numpy`.*"
                                           "pip install numpy"):
        FusedSaLSa([torch.zeros(3, requires_grad=True)], backend="triton")


def test_auto_without_the_extension_falls_back_to_torch_and_says_so_once(monkeypatch):
    monkeypatch.setattr(_ext, "_loaded", False)
    monkeypatch.setattr(_ext, "_error", ImportError("No module named 'salsa_fused._C'"))
    monkeypatch.setattr(backends, "_cpp_fallback_noted", False)
    w = torch.zeros(3, requires_grad=True)
    with pytest.warns(RuntimeWarning, match=r"uses the torch backend on the CPU.*--no-build-isolation") as noted:
        assert FusedSaLSa([w]).backend is torch_backend
    assert len(noted) == 1 and noted[0].filename == __file__  # points at the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process: a second optimizer is quiet
        assert FusedSaLSa([w]).backend is torch_backend
    with pytest.raises(RuntimeError, match=r"C\+\+ extension is not available .*--no-build-isolation"):
        FusedSaLSa([w], backend="cpp")


@pytest.mark.parametrize("cuda_kernels", [True, False])
def test_auto_on_cuda_without_triton_takes_the_extensions_cuda_kernels_or_says_it_falls_back(monkeypatch,
                                                                                              cuda_kernels):
    """On CUDA without Triton, "auto" took the torch backend without a word, whose plain step syncs twice a bucket
    (docs promised a warning); the extension's CUDA kernels, where built, were never tried."""
    monkeypatch.setattr(backends, "triton_usable", lambda device: False)
    monkeypatch.setattr(backends, "usable", lambda name, device: cuda_kernels and name == "cpp")
    monkeypatch.setattr(backends, "_cuda_fallback_noted", False)
    cuda = torch.device("cuda", 0)
    if cuda_kernels:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert backends._auto(cuda) == "cpp"
        return
    with pytest.warns(RuntimeWarning, match=r"uses the torch backend on CUDA: Triton cannot run here .* two syncs "
                                            r"per bucket at every step"):
        assert backends._auto(cuda) == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process
        assert backends._auto(cuda) == "torch"


def test_auto_with_an_extension_that_does_not_load_names_its_error(monkeypatch):
    """A built _C that fails to load (a damaged file, another torch) was reported as "not built"."""
    monkeypatch.setattr(_ext, "_loaded", False)
    monkeypatch.setattr(_ext, "_error", ImportError("/site-packages/salsa_fused/_C.so: file too short"))
    monkeypatch.setattr(backends, "_cpp_fallback_noted", False)
    with pytest.warns(RuntimeWarning, match=r"the C\+\+ extension does not load \(/site-packages/salsa_fused/_C.so: "
                                            r"file too short\)"):
        assert FusedSaLSa([torch.zeros(3, requires_grad=True)]).backend is torch_backend


def test_cpp_on_a_device_without_its_kernels_says_so():
    """(meta parameters are refused before any backend sees them: the check itself, on the one
    device without kernels a CPU machine has)"""
    from salsa_fused.backends import cpp_backend
    with pytest.raises(RuntimeError, match="no kernels for meta tensors"):
        cpp_backend.check(torch.device("meta"))


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match="backend must be one of .*'torch'"):
        FusedSaLSa([torch.zeros(3, requires_grad=True)], backend="cuda-ish")


def test_a_registered_backend_is_chosen_by_name_and_runs_every_pass(monkeypatch):
    calls = []

    def counted(name):
        def run(*args, **kwargs):
            calls.append(name)
            return getattr(torch_backend, name)(*args, **kwargs)
        return run

    mirror = types.SimpleNamespace(name="mirror", check=lambda device: None,
                                   **{p: counted(p) for p in ("slope", "first_trial", "retrial",
                                                              "restore", "plain_step")})
    monkeypatch.setitem(backends.REGISTRY, "mirror", mirror)
    results = {}
    for name in ("mirror", "torch"):
        torch.manual_seed(0)
        w = torch.randn(10, requires_grad=True)
        target = torch.randn(10)
        searches_then_plain = types.SimpleNamespace(scale=lambda k: 1.0, searches=lambda k: k <= 3)
        opt = FusedSaLSa([w], backend=name, schedule=searches_then_plain)
        for _ in range(6):
            opt.zero_grad()
            opt.step(lambda: ((w - target) ** 2).sum())
        results[name] = w.detach().clone()
    assert torch.equal(results["mirror"], results["torch"])
    assert {"slope", "first_trial", "plain_step"} <= set(calls)


def test_register_backend_rejects_an_object_without_the_passes():
    with pytest.raises(TypeError, match="lacks passes"):
        backends.register_backend("half", types.SimpleNamespace(name="half", slope=None))
    with pytest.raises(ValueError, match="other than 'auto'"):
        backends.register_backend("auto", torch_backend)


def test_cuda_backend_refuses_cpu_tensors_by_name():
    """backend="cuda" is the extension's CUDA kernels: on CPU tensors it says so, it never
    falls back to another backend."""
    with pytest.raises(RuntimeError, match="backend 'cuda' runs the extension's CUDA kernels; these tensors are on cpu"):
        backends.load("cuda").check(torch.device("cpu"))
    assert not backends.usable("cuda", torch.device("cpu"))
    params = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(RuntimeError, match="backend 'cuda'"):
        FusedSaLSa(params, backend="cuda")


@pytest.mark.parametrize("flags, backend", [
    (dict(fused=True), cpp_backend), (dict(foreach=False), cpp_backend), (dict(foreach=True), torch_backend),
    (dict(fused=False), torch_backend), (dict(fused=True, foreach=False), cpp_backend),
    (dict(fused=False, foreach=True, backend="torch"), torch_backend), (dict(fused=True, backend="cpp"), cpp_backend),
    (dict(foreach=None, fused=None, backend="torch"), torch_backend)])
def test_foreach_and_fused_choose_the_backend_as_torch_optim_reads_them(flags, backend):
    opt = FusedSaLSa([torch.zeros(3, requires_grad=True)], **flags)
    assert opt.backend is backend
    assert (opt.foreach, opt.fused) == (flags.get("foreach"), flags.get("fused"))


@pytest.mark.parametrize("flags, error, match", [
    (dict(fused=True, foreach=True), ValueError, "`fused` and `foreach` cannot both be True"),
    (dict(fused=False, foreach=False), ValueError, "leave no implementation"),
    (dict(fused=True, backend="torch"), ValueError, "fused=True asks for compiled kernels .* but backend='torch'"),
    (dict(foreach=False, backend="torch"), ValueError, "foreach=False asks for compiled kernels"),
    (dict(foreach=True, backend="cpp"), ValueError, "foreach=True asks for the torch backend .* backend='cpp'"),
    (dict(fused="yes"), TypeError, "fused must be True, False or None"),
])
def test_contradicting_flags_raise_naming_both(flags, error, match):
    w = torch.zeros(3, requires_grad=True)
    with pytest.raises(error, match=match):
        FusedSaLSa([w], **flags)
    assert w.grad is None and torch.equal(w, torch.zeros(3))


def test_fused_without_a_compiled_backend_fails_at_construction_with_the_reason(monkeypatch):
    monkeypatch.setattr(_ext, "require", lambda: (_ for _ in ()).throw(RuntimeError("extension not built")))
    for flags in ({"fused": True}, {"foreach": False}):  # the message names both: either asked for kernels
        with pytest.raises(RuntimeError, match=r"fused=True or foreach=False \(compiled kernels\): no compiled "
                                               "backend runs on cpu here .*cpp: extension not built"):
            FusedSaLSa([torch.zeros(3, requires_grad=True)], **flags)
    assert FusedSaLSa([torch.zeros(3, requires_grad=True)], fused=False).backend is torch_backend


def test_fused_survives_pickling_and_picks_the_kernels_again():
    import pickle

    opt = FusedSaLSa([torch.zeros(3, requires_grad=True)], fused=True)
    again = pickle.loads(pickle.dumps(opt))
    assert again.backend is cpp_backend and again.fused is True
