"""The Streamlit app (``saelab app --sae runs/NAME_OR_GROUP``): Home.py + pages/ (Features, Steering, Circuits),
thin over ``saelab.analysis``.

It lives in the repository's top-level ``app/`` and is installed as the package ``saelab.app`` (setuptools'
``package-dir``), so ``saelab app`` finds it from a regular install as from an editable one. What the
app opens is resolved by ``saelab.targets``, which the CLI shares; nothing in the library imports the app.
"""

from __future__ import annotations

import pathlib

APP_DIR = pathlib.Path(__file__).resolve().parent
HOME = APP_DIR / "Home.py"
