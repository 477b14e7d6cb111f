"""Evaluation of learned features, the paper's protocols: weighted kNN (k=200, weights exp(s/T))
on the memory bank or on recomputed train features, a linear classifier and a linear SVM on
frozen features (the low-dim output and the pooled backbone features), the nearest-neighbour
picture of the retrieval figure, and the training curves."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .knn import knn_evaluate, nearest_neighbors


def knn_results(model, bank: Optional[torch.Tensor], data, *, k: int = 200, temperature: float = 0.07,
                source: str = "both", amp: bool = False, channels_last: bool = False,
                test_features: Optional[torch.Tensor] = None, train_features: Optional[torch.Tensor] = None,
                recall_ks=(1, 10)) -> Dict[str, float]:
    """Weighted kNN of the test images against the training set, keys suffixed by where the
    training features come from: `_bank` (the memory bank, as lemniscate's kNN with
    recompute_memory=0) and/or `_features` (recomputed on un-augmented train images, or the
    train_features given)."""
    if source not in ("bank", "features", "both"):
        raise ValueError(f"kNN source must be bank, features or both, got {source!r}")
    if test_features is None:
        test_features = data.features(model, "test", amp=amp, channels_last=channels_last)
    device = test_features.device
    train_labels, test_labels = data.train_labels.to(device), data.test_labels.to(device)
    k = min(k, data.num_train)
    sources = {}
    if source in ("bank", "both") and bank is not None:
        if bank.shape[0] != data.num_train:
            raise ValueError(f"the bank has {bank.shape[0]} rows but the dataset has {data.num_train} training images")
        sources["bank"] = bank.to(device).float()
    if source in ("features", "both") or not sources:
        sources["features"] = (train_features if train_features is not None
                               else data.features(model, "train", amp=amp, channels_last=channels_last))
    out = {}
    for name, train_features in sources.items():
        scores = knn_evaluate(test_features, test_labels, train_features, train_labels, data.num_classes,
                              k=k, temperature=temperature, recall_ks=recall_ks)
        out.update({f"{key}_{name}": value for key, value in scores.items()})
    return out


def linear_probe(model, data, *, amp: bool = False, channels_last: bool = False, max_iter: int = 200,
                 weight_decay: float = 1e-4, svm: bool = True, svm_c: float = 0.1,
                 svm_max_train: Optional[int] = None, seed: int = 0,
                 lowdim: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> Dict[str, float]:
    """Top-1 (percent) of a linear softmax classifier (full-batch L-BFGS on the training device)
    and of scikit-learn's LinearSVC, trained on frozen features of the un-augmented training
    images and tested on the test split: on the low-dim output (`_lowdim`) and on the pooled
    backbone features (`_pooled`). Features are standardised with the training statistics.
    svm_max_train: fit the SVM on at most this many training images (a fixed random subset;
    liblinear on all of ImageNet takes hours). lowdim: the (train, test) low-dim features if
    already computed."""
    out = {}
    for name, pooled in (("lowdim", False), ("pooled", True)):
        if not pooled and lowdim is not None:
            tr, te = lowdim
        else:
            tr = data.features(model, "train", pooled=pooled, amp=amp, channels_last=channels_last)
            te = data.features(model, "test", pooled=pooled, amp=amp, channels_last=channels_last)
        mean, std = tr.mean(0), tr.std(0) + 1e-6
        tr, te = (tr - mean) / std, (te - mean) / std
        ytr, yte = data.train_labels.to(tr.device), data.test_labels.to(te.device)
        torch.manual_seed(seed)
        clf = torch.nn.Linear(tr.shape[1], data.num_classes).to(tr.device)
        opt = torch.optim.LBFGS(clf.parameters(), lr=1, max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(clf(tr), ytr) + weight_decay * clf.weight.pow(2).sum()
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        with torch.no_grad():
            out[f"linear_top1_{name}"] = 100.0 * (clf(te).argmax(1) == yte).float().mean().item()
        if svm:
            from sklearn.svm import LinearSVC

            x, y = tr.cpu().numpy(), ytr.cpu().numpy()
            if svm_max_train is not None and svm_max_train < len(y):
                keep = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))[:svm_max_train].numpy()
                x, y = x[keep], y[keep]
            classifier = LinearSVC(C=svm_c, max_iter=5000, random_state=seed).fit(x, y)
            out[f"svm_top1_{name}"] = 100.0 * float((classifier.predict(te.cpu().numpy()) == yte.cpu().numpy()).mean())
    return out


def retrieval_png(data, test_features: torch.Tensor, bank: torch.Tensor, path: str, queries: int = 6,
                  k: int = 10) -> None:
    """The paper's retrieval figure: each row a test query and its top-k neighbours in the bank
    (titled with their class and cosine similarity; green when the class matches the query's)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    queries = min(queries, test_features.shape[0])
    q_index = torch.linspace(0, test_features.shape[0] - 1, queries).round().long()
    sims, idx = nearest_neighbors(test_features[q_index.to(test_features.device)], bank.to(test_features.device).float(),
                                  min(k, bank.shape[0]))
    sims, idx = sims.cpu(), idx.cpu()
    q_img = data.raw_images("test", q_index)
    fig, axes = plt.subplots(queries, idx.shape[1] + 1, figsize=(1.2 * (idx.shape[1] + 1), 1.3 * queries), squeeze=False)
    for r in range(queries):
        q_label = int(data.test_labels[q_index[r]])
        row_images = [q_img[r]] + list(data.raw_images("train", idx[r]))
        for c, image in enumerate(row_images):
            ax = axes[r][c]
            img = image.permute(1, 2, 0).cpu().numpy()
            ax.imshow(img[..., 0] if img.shape[2] == 1 else img, cmap="gray" if img.shape[2] == 1 else None)
            ax.set_xticks([]), ax.set_yticks([])
            if c == 0:
                ax.set_title(f"query ({q_label})", fontsize=7)
            else:
                label = int(data.train_labels[idx[r, c - 1]])
                ax.set_title(f"{label} ({sims[r, c - 1].item():.2f})", fontsize=6,
                             color="green" if label == q_label else "red")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_history(history: List[Dict], path: str) -> None:
    """loss and kNN accuracy (the 1-NN monitor and the weighted kNN) per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.plot(epochs, [row["loss"] for row in history], ".-" if len(epochs) < 30 else "-")
    a.set_xlabel("epoch"), a.set_ylabel("loss"), a.set_title("NPID loss")
    b.plot(epochs, [row["knn1_top1"] for row in history], ".-" if len(epochs) < 30 else "-", label="1-NN (bank)")
    knn = [(row["epoch"], row["knn_top1"]) for row in history if "knn_top1" in row]
    if knn:
        b.plot(*zip(*knn), "o-", label="weighted kNN (bank)")
    b.set_xlabel("epoch"), b.set_ylabel("top-1 (%)"), b.set_title("kNN accuracy on the test split")
    if epochs:
        b.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
