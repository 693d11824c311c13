"""The package root: every public name resolves to the object its home module defines, lazily."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import dalle_ds


@pytest.mark.parametrize("name", sorted(dalle_ds._EXPORTS))
def test_public_name_is_the_home_modules_object(name):
    home = importlib.import_module(dalle_ds._EXPORTS[name])
    assert getattr(dalle_ds, name) is getattr(home, name)


def test_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        dalle_ds.Nope  # noqa: B018


def test_import_is_cheap_until_a_name_is_used():
    code = ("import sys, dalle_ds; cheap = 'torch' not in sys.modules; dalle_ds.Pipeline; "
            "print(cheap, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "True"]
