"""Where a CPU training step of the Table 1 setup goes: batched augmentation, encoder forward,
NPID loss (NCE, K=4096, Z per step: two passes over the sampled rows) and backward + SGD, at
B=128 on 28x28 uint8 images, for small-cnn/cnn4 at two widths and three crop sizes.
Run alone on the machine: python3 experiments/table1-pilot/profile_step.py"""
import time

import torch

from npid_kernels.data import BatchAugment
from npid_kernels.models import build_encoder
from npid_kernels.nn import NPIDLoss

torch.manual_seed(0)
images = torch.randint(0, 256, (128, 1, 28, 28), dtype=torch.uint8)
print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
for arch, widths in (("small-cnn", (64, 32)), ("cnn4", (32,))):
    for size in (28, 20, 16):
        for width in widths:
            augment = BatchAugment((0.5,), (0.5,), "paper", out_size=size)
            model = build_encoder(arch, 128, 1, width=width)
            criterion = NPIDLoss(20000, 128, 4096, loss="nce", z_mode="batch", seed=0)
            optimizer = torch.optim.SGD(model.parameters(), lr=0.03, momentum=0.9)
            generator = torch.Generator().manual_seed(0)
            t = [0.0] * 4
            for step in range(12):
                t0 = time.perf_counter()
                x = augment(images, generator)
                t1 = time.perf_counter()
                features = model(x)
                t2 = time.perf_counter()
                loss = criterion(features, torch.randint(0, 20000, (128,)))
                t3 = time.perf_counter()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                t4 = time.perf_counter()
                if step >= 2:  # warm-up steps left out
                    for i, dt in enumerate((t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                        t[i] += dt / 10
            print(f"{arch:9s} width {width:2d} size {size}: augment {t[0] * 1e3:5.1f}  forward {t[1] * 1e3:6.1f}  "
                  f"loss {t[2] * 1e3:5.1f}  backward+SGD {t[3] * 1e3:6.1f} ms/step -> {128 / sum(t):4.0f} img/s")
