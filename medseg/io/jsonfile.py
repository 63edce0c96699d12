"""Reading a JSON file a user gave (a plan, a dataset.json) with every failure as one line naming the file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from medseg.io.nifti import InputError


def read_json(path: str | os.PathLike, what: str) -> Any:
    """The parsed content of ``path``.

    Raises:
        InputError: ``"<path>: <what> not found"``, ``"<path>: invalid JSON at line L, column C: <reason>"`` or
            ``"<path>: cannot read the <what> (<cause>)"``.
    """
    path = Path(path)
    try:
        return json.loads(path.read_bytes())
    except FileNotFoundError:
        raise InputError(f"{path}: {what} not found") from None
    except json.JSONDecodeError as exc:
        raise InputError(
            f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the {what} ({exc})") from None
