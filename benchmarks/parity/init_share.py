"""How one-sided is an untrained U-Net's prediction? autoseg's init vs nnU-Net 2.8.1's, over seeds.

Builds the Hippocampus 3d_fullres network (autoseg's `DynamicUNet` and nnU-Net's `PlainConvUNet`
with `InitWeights_He(1e-2)`) for each seed and prints the mean softmax share of each class on
four real preprocessed cases (zero-padded to the patch), and how often one class takes > 45 %:

    python benchmarks/parity/init_share.py --preprocessed PRE --seeds 20 [--head-init prior]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from torch import nn

PATCH = (40, 56, 40)
STRIDES = ((1, 1, 1), (2, 2, 2), (2, 2, 2), (2, 2, 2))
FEATURES = (32, 64, 128, 256)
ONE_SIDED = 0.45


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preprocessed", type=Path, required=True, help="autoseg's preprocessed root")
    ap.add_argument("--dataset", default="Dataset004_Hippocampus")
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--head-init", choices=("he", "prior"), default="he", help="for autoseg's network")
    a = ap.parse_args()
    from dynamic_network_architectures.architectures.unet import PlainConvUNet
    from dynamic_network_architectures.initialization.weight_init import InitWeights_He

    from autoseg.data.sampling import class_voxel_counts
    from autoseg.nets.unet import DynamicUNet, init_heads_to_prior

    torch.set_num_threads(1)
    folder = a.preprocessed / a.dataset / "3d_fullres"
    cases = sorted(p.name[:-4] for p in folder.glob("*.npy") if not p.name.endswith("_seg.npy"))
    xs = []
    for case in cases[:4]:
        img = np.load(folder / f"{case}.npy")[:, :PATCH[0], :PATCH[1], :PATCH[2]]
        x = np.zeros((1, *PATCH), np.float32)
        x[:, :img.shape[1], :img.shape[2], :img.shape[3]] = img
        xs.append(x)
    batch = torch.from_numpy(np.stack(xs))
    counts = class_voxel_counts(folder, cases, 3)

    def autoseg_net(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        net = DynamicUNet(3, 1, 3, FEATURES, STRIDES, ((3, 3, 3),) * 4, 2)
        if a.head_init == "prior":
            init_heads_to_prior(net, counts)
        return net

    def nnunet_net(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        net = PlainConvUNet(1, 4, list(FEATURES), nn.Conv3d, 3, [list(s) for s in STRIDES], [2] * 4, 3, [2] * 3,
                            True, nn.InstanceNorm3d, {"eps": 1e-5, "affine": True}, None, None, nn.LeakyReLU,
                            {"inplace": True}, deep_supervision=True)
        net.apply(InitWeights_He(1e-2))
        return net

    print(f"label share (background, anterior, posterior): {[round(float(v), 3) for v in counts / counts.sum()]}")
    for name, make in ((f"autoseg ({a.head_init})", autoseg_net), ("nnU-Net", nnunet_net)):
        top = []
        for seed in range(a.seeds):
            with torch.no_grad():
                share = torch.softmax(make(seed)(batch)[0], 1).mean((0, 2, 3, 4)).numpy()
            top.append(share[1:].max())
            print(f"{name:16s} seed {seed:2d}: {[round(float(v), 3) for v in share]}")
        top = np.array(top)
        print(f"{name}: largest foreground share mean {top.mean():.3f}; > {ONE_SIDED} in {(top > ONE_SIDED).sum()}/{a.seeds} seeds")


if __name__ == "__main__":
    main()
