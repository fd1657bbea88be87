"""Saved accounts and the defaults a service is made from, as qiskit-ibm-runtime's.

`QRelayService.save_account(broker=..., token=...)` stores an account by name
in a JSON file readable by its owner only (`~/.qrelay/accounts.json`, or the
file QRELAY_ACCOUNTS_FILE names). A service made without an address takes,
in order: the named account (`name=`), QRELAY_BROKER (with QRELAY_TOKEN),
then the default saved account. An explicit token wins everywhere; without
one, QRELAY_TOKEN is the default.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, NamedTuple

from qrelay.errors import AlreadyExists, InvalidArgument, NotFound

__all__ = [
    "Account",
    "accounts_file",
    "delete_account",
    "resolve_account",
    "save_account",
    "saved_accounts",
]

DEFAULT_NAME = "default"


class Account(NamedTuple):
    """Where a service connects and as whom."""

    broker: str
    token: str | None = None


def accounts_file() -> Path:
    """The saved-accounts file: QRELAY_ACCOUNTS_FILE, else ~/.qrelay/accounts.json."""
    override = os.environ.get("QRELAY_ACCOUNTS_FILE")
    return Path(override) if override else Path.home() / ".qrelay" / "accounts.json"


def _load() -> dict[str, Any]:
    path = accounts_file()
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {"accounts": {}, "default": None}
    except (OSError, ValueError) as exc:
        raise InvalidArgument(f"saved accounts file {path} is unreadable: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("accounts"), dict):
        raise InvalidArgument(f"saved accounts file {path} is not a qrelay accounts file")
    return data


def _store(data: dict[str, Any]) -> None:
    """Write atomically, readable by the owner only: the file holds tokens."""
    path = accounts_file()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".accounts-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(data, out, indent=2, sort_keys=True)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_account(
    broker: str,
    token: str | None = None,
    *,
    name: str = DEFAULT_NAME,
    overwrite: bool = False,
    set_as_default: bool = False,
) -> None:
    """Save an account under `name`; the first one saved is the default."""
    if not broker:
        raise InvalidArgument("broker must be an address HOST:PORT, got an empty string")
    if not name:
        raise InvalidArgument("name must not be empty")
    data = _load()
    accounts: dict[str, Any] = data["accounts"]
    if name in accounts and not overwrite:
        raise AlreadyExists(
            f"an account named {name!r} is already saved; pass overwrite=True to replace it"
        )
    accounts[name] = {"broker": broker, "token": token}
    if set_as_default or not data.get("default") or data["default"] not in accounts:
        data["default"] = name
    _store(data)


def saved_accounts() -> dict[str, dict[str, Any]]:
    """Every saved account by name (`broker`, `token`, `is_default`)."""
    data = _load()
    return {
        name: {**entry, "is_default": name == data.get("default")}
        for name, entry in data["accounts"].items()
    }


def delete_account(name: str = DEFAULT_NAME) -> bool:
    """Forget the account `name`; False if there was none."""
    data = _load()
    if data["accounts"].pop(name, None) is None:
        return False
    if data.get("default") == name:
        data["default"] = next(iter(data["accounts"]), None)
    _store(data)
    return True


def _saved(name: str | None) -> Account | None:
    data = _load()
    wanted = name or data.get("default")
    if not wanted:
        return None
    entry = data["accounts"].get(wanted)
    if entry is None:
        if name is None:
            return None
        raise NotFound(f"no saved account named {name!r} (saved: {sorted(data['accounts'])})")
    return Account(str(entry["broker"]), entry.get("token") or None)


def _env_token() -> str | None:
    """QRELAY_TOKEN, or the contents of the file QRELAY_TOKEN_FILE names."""
    token = os.environ.get("QRELAY_TOKEN") or None
    path = os.environ.get("QRELAY_TOKEN_FILE")
    if token is None and path:
        try:
            token = Path(path).read_text(encoding="utf-8").strip() or None
        except OSError as exc:
            raise InvalidArgument(f"cannot read QRELAY_TOKEN_FILE {path}: {exc.strerror}") from None
    return token


def resolve_account(
    address: str | None = None, token: str | None = None, name: str | None = None
) -> Account:
    """The account a service made from these arguments uses (see the module docstring)."""
    env_token = _env_token()
    if name is not None:
        saved = _saved(name)
        assert saved is not None
        return Account(address or saved.broker, token or saved.token or env_token)
    if address:
        return Account(address, token or env_token)
    env_broker = os.environ.get("QRELAY_BROKER")
    if env_broker:
        return Account(env_broker, token or env_token)
    saved = _saved(None)
    if saved is not None:
        return Account(saved.broker, token or saved.token or env_token)
    raise InvalidArgument(
        "no broker to connect to: pass an address, set QRELAY_BROKER, or save an account "
        "with QRelayService.save_account(broker=..., token=...)"
    )
