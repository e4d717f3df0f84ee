"""The metrics stage's plots: ROC, precision-recall and calibration of binary models; per task
type (multi-class, survival, regression) the best model's own plots."""

from __future__ import annotations

import numpy as np


def plot_curves(results: dict[str, dict], roc_png: str, pr_png: str, calibration_png: str, ece_bins: int = 10) -> None:
    """ROC, precision-recall and calibration (reliability) plots of every model's out-of-fold predictions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import precision_recall_curve, roc_curve

    from ..io import atomic_path

    figs = {name: plt.subplots(figsize=(5.5, 5)) for name in ("roc", "pr", "cal")}
    for model, res in results.items():
        oof = res["oof"]
        y, p = oof["y"].to_numpy(), oof["prob"].to_numpy()
        if len(np.unique(y)) < 2:
            continue
        fpr, tpr, _ = roc_curve(y, p)
        figs["roc"][1].plot(fpr, tpr, label=f"{model} (AUC {res['pooled']['auc']:.3f})")
        prec, rec, _ = precision_recall_curve(y, p)
        figs["pr"][1].plot(rec, prec, label=model)
        bins = np.minimum((p * ece_bins).astype(int), ece_bins - 1)
        xs = [p[bins == b].mean() for b in range(ece_bins) if (bins == b).any()]
        ys = [y[bins == b].mean() for b in range(ece_bins) if (bins == b).any()]
        figs["cal"][1].plot(xs, ys, marker="o", label=f"{model} (ECE {res['pooled']['ece']:.3f})")
    labels = {"roc": ("False positive rate", "True positive rate", "ROC (out-of-fold test slides)"),
              "pr": ("Recall", "Precision", "Precision-recall"),
              "cal": ("Mean predicted probability", "Fraction positive", "Calibration")}
    for key, path in (("roc", roc_png), ("pr", pr_png), ("cal", calibration_png)):
        fig, ax = figs[key]
        if key in ("roc", "cal"):
            ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        xl, yl, title = labels[key]
        ax.set(xlabel=xl, ylabel=yl, title=title, xlim=(0, 1), ylim=(0, 1.02))
        ax.legend(fontsize=7, loc="lower right" if key != "pr" else "lower left")
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
        plt.close(fig)


def _save(fig, path: str) -> None:
    import matplotlib.pyplot as plt

    from ..io import atomic_path

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def plot_target(task, results: dict[str, dict], best: str, plots: dict[str, str]) -> None:
    """Multi-class: one-vs-rest ROC per class, PR per class, top-class calibration, confusion
    matrix; survival: Kaplan-Meier by risk group; regression: predicted vs true scatter (best model)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .. import targets as T

    res = results[best]
    oof = res["oof"]
    if task.multiclass:
        from sklearn.metrics import precision_recall_curve, roc_curve

        y, prob = oof["y"].to_numpy(int), oof[task.score_columns].to_numpy(float)
        for key in ("roc", "pr"):
            fig, ax = plt.subplots(figsize=(5.5, 5))
            for k, c in enumerate(task.classes):
                if len(np.unique(y == k)) < 2:
                    continue
                if key == "roc":
                    fpr, tpr, _ = roc_curve(y == k, prob[:, k])
                    ax.plot(fpr, tpr, label=f"{c} (AUC {res['pooled'][f'auc_{c}']:.3f})")
                else:
                    pr, rc, _ = precision_recall_curve(y == k, prob[:, k])
                    ax.plot(rc, pr, label=c)
            if key == "roc":
                ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
            ax.set(xlabel="False positive rate" if key == "roc" else "Recall", ylabel="True positive rate" if key == "roc" else "Precision",
                   title=f"{best}: one-vs-rest {'ROC' if key == 'roc' else 'precision-recall'}", xlim=(0, 1), ylim=(0, 1.02))
            ax.legend(fontsize=7)
            _save(fig, plots[key])
        fig, ax = plt.subplots(figsize=(5.5, 5))
        conf, hit = prob.max(1), (prob.argmax(1) == y).astype(float)
        bins = np.minimum((conf * 10).astype(int), 9)
        xs = [conf[bins == b].mean() for b in range(10) if (bins == b).any()]
        ys = [hit[bins == b].mean() for b in range(10) if (bins == b).any()]
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        ax.plot(xs, ys, marker="o", label=best)
        ax.set(xlabel="Top-class probability", ylabel="Accuracy", title="Calibration (top class)", xlim=(0, 1), ylim=(0, 1.02))
        _save(fig, plots["calibration"])
        m = np.asarray(res["confusion"]["matrix"])
        fig, ax = plt.subplots(figsize=(1.2 * len(task.classes) + 2.5, 1.2 * len(task.classes) + 2))
        ax.imshow(m, cmap="Blues")
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                ax.text(j, i, str(m[i, j]), ha="center", va="center")
        ax.set(xticks=range(len(task.classes)), yticks=range(len(task.classes)), xticklabels=task.classes,
               yticklabels=task.classes, xlabel="predicted (argmax)", ylabel="true", title=f"{best}: confusion matrix")
        _save(fig, plots["confusion_png"])
    elif task.type == "survival":
        fig, ax = plt.subplots(figsize=(6, 4.5))
        for grp, colour in (("low", "tab:blue"), ("high", "tab:red")):
            part = oof[oof["risk_group"] == grp]
            if part.empty:
                continue
            t, s = T.kaplan_meier(part["time"], part["event"])
            ax.step(np.r_[0, t], np.r_[1, s], where="post", color=colour, label=f"{grp} risk (n={len(part)})")
            cens = part[part["event"] == 0]
            ax.plot(cens["time"], np.interp(cens["time"], np.r_[0, t], np.r_[1, s]), "|", color=colour)
        p = res["risk_groups"]["logrank_p"]
        ax.set(xlabel="time", ylabel="survival", ylim=(0, 1.02),
               title=f"{best}: Kaplan-Meier by risk group (log-rank p={p:.3g})")
        ax.legend(fontsize=8)
        _save(fig, plots["km"])
    else:
        fig, ax = plt.subplots(figsize=(5.5, 5))
        ax.scatter(oof["y"], oof["value"], s=18)
        lo, hi = float(min(oof["y"].min(), oof["value"].min())), float(max(oof["y"].max(), oof["value"].max()))
        ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
        pooled = res["pooled"]
        ax.set(xlabel="true value", ylabel="predicted value",
               title=f"{best}: r={pooled['pearson_r']:.2f}, R²={pooled['r2']:.2f}, MAE={pooled['mae']:.3g}")
        _save(fig, plots["scatter"])

