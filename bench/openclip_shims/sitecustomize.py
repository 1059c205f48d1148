"""Two work-arounds that let OpenCLIP's own trainer (open_clip_train) run on CPU for
bench/vs_openclip.py. Python imports this file at start-up when its folder is on PYTHONPATH,
which the bench does only for the OpenCLIP runs, in OpenCLIP's venv: nothing of the product
depends on it, and neither trainer's code is changed.

1. PyPI's torchvision wheel is a CUDA build: its compiled ops (_C.so, image.so) link
   libtorch_cuda, which a CPU torch does not have. Their load is refused here, so torchvision
   says it has no compiled ops (extension._has_ops() is False, as for a build without them),
   and torchvision._meta_registrations, whose fake kernel for torchvision::nms is registered
   even when that op was never defined (and then fails the import), becomes an empty module.
   OpenCLIP only uses torchvision's Python transforms, which need none of these ops.
2. open_clip_train wraps the model in DistributedDataParallel(model, device_ids=[device])
   whatever the device; torch refuses device_ids for a CPU module. Here CPU device_ids (and
   output_device) are dropped, which is what DDP wants for CPU.

Both act when the module in question is first imported (a meta path finder), so start-up
imports nothing extra.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys


def _refuse_torchvision_library(load_library):
    def load(path):
        if "torchvision" in str(path):
            raise OSError(f"{path}: refused on CPU torch (bench/openclip_shims)")
        return load_library(path)

    return load


def _run_extension_without_ops(module, run):
    """Run torchvision/extension.py with torchvision's libraries refused, then make its
    _load_library answer False for the libraries other modules load later (io's image.so)."""
    import torch

    original = torch.ops.load_library
    torch.ops.load_library = _refuse_torchvision_library(original)
    try:
        run(module)
    finally:
        torch.ops.load_library = original
    module._load_library = lambda lib_name: False


def _skip_module(module, run):
    """An empty module: its registrations need the compiled ops that were never loaded."""
    module.__doc__ = "emptied by bench/openclip_shims: torchvision's compiled ops are not loaded"


def _ddp_init_without_cpu_devices(init):
    def __init__(self, module, device_ids=None, output_device=None, *args, **kwargs):
        if device_ids is not None and all(_is_cpu(d) for d in device_ids):
            device_ids, output_device = None, None
        init(self, module, device_ids, output_device, *args, **kwargs)

    return __init__


def _is_cpu(device) -> bool:
    return str(device).split(":")[0] == "cpu"


def _patch_ddp(module, run):
    run(module)
    ddp = module.DistributedDataParallel
    ddp.__init__ = _ddp_init_without_cpu_devices(ddp.__init__)


# module name -> how its code is run (run(module) executes the real file)
HOOKS = {
    "torchvision.extension": _run_extension_without_ops,
    "torchvision._meta_registrations": _skip_module,
    "torch.nn.parallel.distributed": _patch_ddp,
}


class _Loader(importlib.abc.Loader):
    def __init__(self, real, hook):
        self.real, self.hook = real, hook

    def create_module(self, spec):
        return self.real.create_module(spec)

    def exec_module(self, module):
        self.hook(module, self.real.exec_module)


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        hook = HOOKS.get(name)
        if hook is None:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path, target)
        if spec is not None and spec.loader is not None:
            spec.loader = _Loader(spec.loader, hook)
        return spec


sys.meta_path.insert(0, _Finder())
