"""Installation of the Python packages the engine needs, and the sentence saying where it runs.

Slicer's own process imports only the engine's torch-free core: its few packages missing from a
fresh Slicer (:data:`CORE_PACKAGES`, small) are installed when the module loads. PyTorch and MONAI
serve only the worker process (which runs Slicer's Python too): they are installed on the first
Apply, after asking (the pattern of SlicerTotalSegmentator and SlicerMONAIAuto3DSeg). PyTorch
comes through the PyTorch extension (PyTorchUtils), which picks a CUDA build for the GPU.

Standard library and ``slicer`` only, so it works before anything is installed. Whether a GPU is
used is decided by the worker when it starts; its ready message says which device it got.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Iterable

import slicer

#: the Python packages the engine needs (import name -> pip requirement); torch comes via PyTorchUtils
REQUIREMENTS = {"monai": "monai>=1.4", "einops": "einops>=0.7", "safetensors": "safetensors>=0.4",
                "SimpleITK": "SimpleITK>=2.3", "skimage": "scikit-image>=0.22", "slicerio": "slicerio>=1.1",
                "pydicom": "pydicom>=2.4", "matplotlib": "matplotlib>=3.7", "tqdm": "tqdm>=4.60"}
TORCH_REQUIREMENT = ">=2.2"
#: the packages Slicer's own process needs (the engine's torch-free core); the others serve the worker
CORE_PACKAGES = ("safetensors", "SimpleITK", "skimage", "slicerio", "pydicom", "matplotlib")

#: what the panel says about the device before a worker has started
DEVICE_UNKNOWN = "GPU or CPU: decided when the analysis starts."


def missingRequirements(packages: Iterable[str] = tuple(REQUIREMENTS)) -> list[str]:
    """The pip requirements of ``packages`` (import names) that are not installed (nothing is imported)."""
    return [REQUIREMENTS[name] for name in packages if importlib.util.find_spec(name) is None]


def installCorePackages() -> None:
    """Install the engine core's packages a fresh Slicer lacks (no question: small, and the module needs them to load)."""
    missing = missingRequirements(CORE_PACKAGES)
    if not missing:
        return
    try:
        slicer.util.pip_install(" ".join(f'"{m}"' for m in missing))
    except Exception as exc:  # noqa: BLE001 - offline or blocked: one sentence instead of a traceback
        raise ImportError(f"DiffusionAnomaly needs the Python packages {', '.join(missing)}, which could not be "
                          f"installed ({exc}); connect to the internet and restart Slicer, or install them with "
                          "slicer.util.pip_install in the Python console.") from exc


def installTorch() -> bool:
    """Install PyTorch through the PyTorch extension after asking; False when the user declined or it failed."""
    try:
        import PyTorchUtils  # the PyTorch extension: present only in a Slicer application that has it
    except ImportError:
        slicer.util.errorDisplay("This module needs PyTorch. Install the 'PyTorch' extension from the "
                                 "Extensions Manager, restart Slicer and press Apply again.")
        return False
    torchLogic = PyTorchUtils.PyTorchUtilsLogic()
    if torchLogic.torchInstalled():
        return True
    if not slicer.util.confirmOkCancelDisplay(
            "DiffusionAnomaly needs PyTorch (about 1-3 GB; a CUDA build is chosen when a GPU is "
            "present). Install it now? This can take several minutes.", "Install PyTorch"):
        return False
    if torchLogic.installTorch(askConfirmation=False, torchVersionRequirement=TORCH_REQUIREMENT) is None:
        slicer.util.errorDisplay("PyTorch could not be installed; see the Python console for details.")
        return False
    return True


def ensureDependencies() -> bool:
    """Install what the worker still lacks after asking (PyTorch first); True when everything is there."""
    if importlib.util.find_spec("torch") is None and not installTorch():
        return False
    missing = missingRequirements()
    if not missing:
        return True
    if not slicer.util.confirmOkCancelDisplay("DiffusionAnomaly needs these Python packages, which will be "
                                              "installed now:\n" + "\n".join(missing), "Install Python packages"):
        return False
    with slicer.util.WaitCursor():
        slicer.util.pip_install(" ".join(f'"{m}"' for m in missing))
    still = missingRequirements()
    if still:
        slicer.util.errorDisplay(f"These packages could not be installed: {', '.join(still)}.")
        return False
    return True


def deviceSentence(ready: dict[str, Any] | None) -> str:
    """One sentence on where the analysis runs, from the worker's ready message (None: no worker yet)."""
    if not ready:
        return DEVICE_UNKNOWN
    if ready.get("gpu"):
        return f"Running on the GPU ({ready.get('device', 'cuda')})."
    return "Running on the CPU (a run takes minutes; a CUDA GPU makes it much faster)."
