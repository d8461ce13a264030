"""The ops' bad-input tests, one shape for all: each call raises the stated exception, its message
matching the stated pattern."""

import pytest
import torch


def bad_input_test(fn, calls):
    """A test function (bind it to a test_* name) running fn on each of calls(): (args, kwargs,
    exception type, message regex). calls builds its tensors per test, so none is shared."""

    @pytest.mark.parametrize("i", range(len(calls())))
    def test(i):
        args, kwargs, exc, match = calls()[i]
        with pytest.raises(exc, match=match):
            fn(*args, **kwargs)

    return test


def image_text_bad_calls(x, y, t):
    """Bad inputs that every image-text loss (x, y: [4, 8] float32 features, t: the scale) refuses
    alike: fastssl.validation.check_image_text and the backend's dtype rule."""
    return [
        ((x[0], y, t), {}, ValueError, "image_features must be 2-D"),
        ((x, y[:, None], t), {}, ValueError, "text_features must be 2-D"),
        ((x, y[:, :5], t), {}, ValueError, "text_features must have D=8"),
        ((x, y.half(), t), {}, TypeError, "must share one dtype"),
        ((x.long(), y, t), {}, TypeError, "image_features must have dtype"),
        ((x, y.to("meta"), t), {}, ValueError, "text_features must be on cpu"),
        ((x, y, torch.ones(2)), {}, ValueError, "logit_scale must hold one value"),
        ((x, y, t, torch.ones(1, 2)), {}, ValueError, "logit_bias must hold one value"),
        ((x, y, "10"), {}, TypeError, "logit_scale must be a torch.Tensor"),
        (([[1.0]], y, t), {}, TypeError, "image_features must be a torch.Tensor"),
        ((x.double(), y.double(), t), {"backend": "triton"}, TypeError, "float64"),
        ((x, y, t), {"backend": "cuda"}, ValueError, "backend"),
    ]
