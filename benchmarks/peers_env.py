"""Make the peers' venv importable with the pinned CPU torch.

PyPI's torchvision and torchaudio builds do not load beside torch 2.13 ('operator torchvision::nms does
not exist'), so `make bench-peers` uninstalls them. transformers runs without torchvision, but
LLaMA-Factory imports torchaudio unconditionally for its audio plugin; text SFT never calls it, so an
empty stand-in package is enough. Run with the peers' python.
"""

import site
from pathlib import Path

stub = Path(site.getsitepackages()[0]) / "torchaudio"
stub.mkdir(exist_ok=True)
(stub / "__init__.py").write_text('"""Stand-in (benchmarks/peers_env.py): LLaMA-Factory imports torchaudio for audio only."""\n')
print(f"wrote {stub}")
