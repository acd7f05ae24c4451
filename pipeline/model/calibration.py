"""Temperature scaling: one number per trained model that makes its probabilities honest.

A model's probabilities p become softmax(log(p) / T): T > 1 softens an overconfident model, T < 1
sharpens an underconfident one, and the predicted class never changes. T is fitted on the
validation split (the negative log-likelihood, minimised over log T), saved in the model's record
(`entry`), and applied by `apply_temperature` wherever probabilities are produced: predict,
evaluate, the Classifier and the exported graph (`temperature_graph`, the same formula in Keras
ops). A validation split under MIN_IMAGES keeps T = 1 and says so.

The expected calibration error and the reliability curve (`reliability`) are what the report
shows before and after.
"""
import numpy as np

MIN_IMAGES = 30            # validation images below which one fitted number is mostly noise
BOUNDS = (0.2, 10.0)       # the temperatures searched: beyond them a fit says more about the
                           # split (no mistakes at all, or only mistakes) than about the model
FLOOR = 1e-7               # probabilities are clipped here before the log: float32's resolution
BINS = 10                  # equal-width confidence bins of the reliability diagram and ECE


def apply_temperature(probabilities, temperature):
    """(n, classes) probabilities -> softmax(log(max(p, FLOOR)) / T), as float64."""
    p = np.asarray(probabilities, np.float64)
    if temperature == 1.0:
        return p
    z = np.log(np.clip(p, FLOOR, 1.0)) / temperature
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def temperature_graph(probabilities, temperature):
    """`apply_temperature` on a Keras tensor of (n, classes) probabilities, for a graph."""
    import keras
    if temperature == 1.0:
        return probabilities
    logits = keras.ops.log(keras.ops.clip(probabilities, FLOOR, 1.0)) / temperature
    return keras.ops.softmax(logits, axis=-1)


def negative_log_likelihood(probabilities, labels):
    p = np.clip(np.asarray(probabilities, np.float64)[np.arange(len(labels)), labels], 1e-300, 1)
    return float(-np.mean(np.log(p)))


def fit(probabilities, labels, min_images=MIN_IMAGES):
    """The calibration record of a model from its validation probabilities and labels:
    {"temperature", "images", "nll_before", "nll_after", "ece_before", "ece_after", "note"}.
    With fewer than `min_images` images T stays 1 and "note" says why."""
    from scipy.optimize import minimize_scalar

    p, labels = np.asarray(probabilities, np.float64), np.asarray(labels, np.int64)
    before = {"nll_before": negative_log_likelihood(p, labels) if len(p) else None,
              "ece_before": reliability(p, labels)["ece"] if len(p) else None}
    if len(p) < min_images:
        return {"temperature": 1.0, "images": int(len(p)), **before,
                "nll_after": before["nll_before"], "ece_after": before["ece_before"],
                "note": f"the validation split has {len(p)} images, fewer than the {min_images} "
                        "that calibration needs: temperature kept at 1"}
    result = minimize_scalar(
        lambda log_t: negative_log_likelihood(apply_temperature(p, np.exp(log_t)), labels),
        bounds=tuple(np.log(BOUNDS)), method="bounded", options={"xatol": 1e-4})
    temperature = float(np.exp(result.x))
    after = apply_temperature(p, temperature)
    note = "" if BOUNDS[0] * 1.01 < temperature < BOUNDS[1] / 1.01 else (
        f"the fit stopped at the bound {temperature:.2f}: the validation split barely "
        "constrains it")
    return {"temperature": temperature, "images": int(len(p)), **before,
            "nll_after": negative_log_likelihood(after, labels),
            "ece_after": reliability(after, labels)["ece"], "note": note}


def fit_model(model, dataset, labels):
    """`fit` on a Keras model's probabilities of `dataset`, whose rows are `labels` in order."""
    from .heads import class_probabilities
    return fit(class_probabilities(model.predict(dataset, verbose=0)), labels)


def reliability(probabilities, labels, bins=BINS):
    """How far the model's confidence is from its accuracy: the reliability curve of its top
    label (sklearn.calibration.calibration_curve of "the predicted class is right" against the
    probability given to it, equal-width bins), the expected calibration error (the bins' |
    accuracy - confidence| weighted by their share of images) and the multiclass Brier score
    (mean squared distance of the probabilities from the one-hot truth; 0 is perfect)."""
    from sklearn.calibration import calibration_curve

    probabilities = np.asarray(probabilities, np.float64)
    confidence = probabilities.max(axis=1)
    correct = (probabilities.argmax(axis=1) == labels).astype(int)
    accuracy, mean_confidence = calibration_curve(correct, confidence, n_bins=bins,
                                                  strategy="uniform")
    # the bins calibration_curve keeps (those with images), as it assigns them
    counts = np.bincount(np.searchsorted(np.linspace(0, 1, bins + 1)[1:-1], confidence),
                         minlength=bins)
    counts = counts[counts > 0]
    truth = np.eye(probabilities.shape[1])[labels]
    return {"bins": bins, "accuracy": accuracy.tolist(), "confidence": mean_confidence.tolist(),
            "counts": counts.tolist(),
            "ece": float(np.sum(counts * np.abs(accuracy - mean_confidence)) / len(labels)),
            "brier": float(np.mean(np.sum((probabilities - truth) ** 2, axis=1)))}
