"""Reading settings from TOML tables with errors that name the file and the field.

Every model and experiment file is read through :class:`Fields`, so that a typo, a missing
entry or a value of the wrong type stops the run before any training with a message such as
``models/net.toml: layers[2].kernel_size: expected an integer >= 1, got 0``.
"""

from __future__ import annotations

import codecs
import contextlib
import difflib
import math
import numbers
import os
import reprlib
import tomllib
import unicodedata
from pathlib import Path
from typing import Any


def home_expanded(path: str | os.PathLike, what: str) -> Path:
    """``path`` with a leading ``~`` or ``~user`` made that home folder, as a shell makes it
    (which it does not in ``--out=~/runs``, nor in a file).

    Parameters
    ----------
    path : str or os.PathLike
        The path given.
    what : str
        Names where it was given, for the message (``"--out"``, ``"AGREL_SIM_DATA"``).

    Returns
    -------
    Path
        The path, expanded.

    Raises
    ------
    ConfigError
        Where the ``~`` names a user without a home folder on this machine.
    """
    try:
        return Path(path).expanduser()
    except RuntimeError:  # "Could not determine home directory."
        raise ConfigError(f"{what}: {str(path)!r}: its ~ names no home folder of this machine; give the full path") from None


def in_the_way(folder: Path) -> str | None:
    """What stops ``folder`` from being made, where something does: a file, or a link to
    nothing, where it or a folder above it would be.

    Parameters
    ----------
    folder : Path
        A folder to be made.

    Returns
    -------
    str or None
        Such as ``"runs is not a folder"``, for an error message; None where nothing is in the way.
    """
    for path in (folder, *folder.parents):
        if path.is_symlink() and not path.exists():
            return f"{path} is a link to {os.readlink(path)}, which does not exist"
        if path.exists():
            return None if path.is_dir() else f"{path} is not a folder"
    return None


class ConfigError(ValueError):
    """A model or experiment description is invalid.

    The message names the source (a file, or ``<python>`` for objects built in code), the field
    and what is wrong, and where it helps, what to do.
    """


def is_count(value, minimum: int = 1) -> bool:
    """Whether ``value`` is a Python integer (not a bool) of at least ``minimum`` that fits in 64 bits, as torch needs.

    NumPy integers are refused, as settings are stored as JSON; :func:`shown` says in messages what to do.

    Parameters
    ----------
    value : object
        The value to check.
    minimum : int
        The smallest count allowed (default 1).

    Returns
    -------
    bool
    """
    return isinstance(value, int) and not isinstance(value, bool) and minimum <= value < 2**63


def check_instance(name: str, value, kind: type) -> None:
    """Raise ValueError, naming the argument ``name``, unless ``value`` is a ``kind``.

    Parameters
    ----------
    name : str
        The argument's name, for the message.
    value : object
        The argument.
    kind : type
        The class it must be an instance of.
    """
    if not isinstance(value, kind):
        raise ValueError(f"{name}: expected an object of class {kind.__name__}, got {type(value).__name__} {reprlib.repr(value)}")


def shown(value, count: bool = False) -> str:
    """Show ``value`` in an error message: its ``repr``, or the number of digits of a long integer.

    Where a NumPy number was given, the text says what to do instead, and for a ``count`` (a
    setting that takes an integer), it says where the integer lies beyond 64 bits.

    Parameters
    ----------
    value : object
        The value given.
    count : bool
        Whether the setting takes an integer (default False).

    Returns
    -------
    str
    """
    if isinstance(value, numbers.Integral) and type(value).__module__ == "numpy":
        return f"{value!r} (a NumPy integer; give a Python one: int(x))"
    if isinstance(value, numbers.Real) and not isinstance(value, (int, float)):
        kind = "a NumPy float" if type(value).__module__ == "numpy" else f"a {type(value).__name__}"
        return f"{value!r} ({kind}; give a Python float: float(x))"
    if not isinstance(value, int) or isinstance(value, bool):
        return repr(value)
    text = repr(value) if abs(value) < 10**30 else f"an integer of about {int(abs(value).bit_length() * math.log10(2)) + 1} digits"
    return f"{text} (outside the 64-bit integers that torch takes)" if count and abs(value) >= 2**63 else text


def is_folder_name(value) -> bool:
    """Whether ``value`` can name a folder of its own: not empty, not ``.`` or ``..``, without ``/``,
    ``\\`` or control characters (a NUL, a line break).

    Parameters
    ----------
    value : object
        The name given.

    Returns
    -------
    bool
    """
    return (isinstance(value, str) and bool(value.strip()) and value not in (".", "..") and not any(c in value for c in "/\\")
            and not any(unicodedata.category(c) == "Cc" for c in value))


# Each kind of agrel-sim file has a key that only it has; a file of another kind given in its place is named by it.
FILE_KINDS = {
    "sweep": ("experiments", "a sweep file (it lists experiments)"),
    "experiment": ("model", "an experiment file (it names a model)"),
    "model": ("layers", "a model file (it lists layers)"),
}


def file_kind(table) -> str | None:
    """The kind of file a parsed TOML table is, by the one key of ``experiments``, ``model``
    and ``layers`` it has.

    Parameters
    ----------
    table : object
        The parsed file.

    Returns
    -------
    str or None
        A key of :data:`FILE_KINDS`; None for a table with none of those keys, or with more
        than one (a file of one kind with a stray key, which its reader names).
    """
    if not isinstance(table, dict):
        return None
    kinds = [kind for kind, (key, _) in FILE_KINDS.items() if key in table]
    return kinds[0] if len(kinds) == 1 else None


def is_number(value, check=lambda v: True) -> bool:
    """Whether ``value`` is a finite Python int or float (not a bool) for which ``check`` holds.

    Other numbers (NumPy's float32, fractions) are refused, as settings are stored as JSON and
    computed with as Python floats; :func:`shown` says in messages what to do.

    Parameters
    ----------
    value : object
        The value to check.
    check : callable
        A predicate on the number (default: any).

    Returns
    -------
    bool
    """
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return False
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an integer beyond the floats
        return False
    return finite and check(value)


def is_fraction(value) -> bool:
    """Whether ``value`` is a finite Python number in ``[0, 1)`` (not a bool).

    Parameters
    ----------
    value : object
        The value to check.

    Returns
    -------
    bool
    """
    return is_number(value, lambda v: 0 <= v < 1)


# Arguments of Fields.get for the kinds of setting that many tables hold.
POSITIVE_INT = dict(kind=int, check=is_count, hint="an integer >= 1")
FRACTION = dict(kind=float, check=is_fraction, hint="a fraction in [0, 1)")


def read_toml(path: Path) -> dict[str, Any]:
    """Parse a TOML file.

    Parameters
    ----------
    path : Path
        The file.

    Returns
    -------
    dict
        Its top-level table.

    Raises
    ------
    ConfigError
        Naming the file, where it is missing, unreadable, binary, not UTF-8, malformed or
        nested too deeply to read.
    """
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file; give the path of a .toml file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder; give the path of a .toml file") from None
    except OSError as error:
        raise ConfigError(f"{path}: cannot read the file ({error.strerror}); check its permissions") from None
    if b"\0" in raw and not raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):  # no UTF-8 or 8-bit text holds a NUL byte
        raise ConfigError(f"{path}: not TOML but a binary file (a run file or a checkpoint?); give the path of a .toml file")
    try:
        return tomllib.loads(raw.decode("utf-8-sig"))  # a byte-order mark, as some editors write, is no TOML error
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: TOML files are UTF-8 text, and this one is not ({error}); save it as UTF-8") from None
    except ValueError as error:  # TOMLDecodeError, or an integer of thousands of digits, say
        raise ConfigError(f"{path}: not valid TOML: {error}") from None
    except RecursionError:  # tomllib reads nested arrays and tables recursively
        raise ConfigError(f"{path}: cannot be read: its arrays or tables are nested too deeply (hundreds of levels); agrel-sim's files need a few") from None


def _check_writable_as_toml(value, key: str) -> None:
    """Raise ConfigError, naming ``key``, for a value that TOML cannot hold."""
    if isinstance(value, dict):
        for name, item in value.items():
            _check_writable_as_toml(item, f"{key}.{name}" if key else name)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_writable_as_toml(item, f"{key}[{index}]")
    elif isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate, such as os.fsdecode makes of a file name that is not UTF-8
            raise ConfigError(f"{key}: {value!r} is no text that a TOML file, which is UTF-8, can hold; give another") from None
    elif not isinstance(value, (bool, int, float)):
        raise ConfigError(
            f"{key}: {value!r} ({type(value).__name__}) cannot be written to a TOML file, which holds numbers, strings,"
            " true/false, lists and tables; give it as one of them (a Brian2 duration as a number of milliseconds)"
        )


@contextlib.contextmanager
def written_beside(path: Path):
    """Yield the path ``path`` + ``.partial`` to write, and rename it over ``path`` when the block
    ends: a failed write (the block raises, or the rename) leaves whatever was at ``path``, and
    no partial file; a link at ``path`` is replaced, never written through.

    Parameters
    ----------
    path : Path
        The file to write.

    Yields
    ------
    Path
        The file to write in the block.
    """
    partial = path.with_name(path.name + ".partial")
    try:
        yield partial
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):
            partial.unlink()
        raise


def write_toml(path: str | os.PathLike, table: dict, writer: str, overwrite: bool = False) -> Path:
    """Write ``table`` as the TOML file ``path``, which :func:`read_toml` reads back as ``table``
    (tuples as lists), under a first comment line naming ``writer``.

    The file is written beside ``path`` and renamed over it (:func:`written_beside`).

    Parameters
    ----------
    path : str or os.PathLike
        The file; its name must end in ``.toml``.
    table : dict
        Plain data: numbers, strings, booleans, lists and dicts.
    writer : str
        What wrote the file, for its first line (``"ColumnNetwork.to_toml"``).
    overwrite : bool
        Replace an existing file; False (default): an existing file is an error.

    Returns
    -------
    Path
        ``path``.

    Raises
    ------
    ConfigError
        Naming the path, for a name that does not end in ``.toml``, a folder that does not
        exist, an existing file without ``overwrite``, or a value that TOML cannot hold
        (naming its key).
    OSError
        Where the file cannot be written.
    """
    import tomli_w  # here, not above: describing and training networks need no TOML writer

    path = Path(path)
    if path.suffix != ".toml" and path.name != ".toml":
        raise ConfigError(f"{path}: not a path for a TOML file: its name does not end in .toml, as agrel-sim's model and experiment files do; give one that does")
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder; give the path of a .toml file")
    if path.exists() and not overwrite:
        raise ConfigError(f"{path}: exists already; give another path, or pass overwrite=True to replace it")
    if not path.parent.is_dir():
        raise ConfigError(f"{path}: its folder {path.parent} does not exist; make it first")
    try:
        _check_writable_as_toml(table, "")
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    text = f"# Written by agrel_sim's {writer}.\n" + tomli_w.dumps(table)
    with written_beside(path) as partial:
        partial.write_text(text, encoding="utf-8")
    return path


def _named_instead(path: Path, kind: str, env_var: str, what: str) -> str:
    """Where a ``.toml`` file name alone is not found here but the name is among the ``kind``
    files, a hint to give the name; else nothing."""
    if len(path.parts) > 1 or not path.stem.strip():
        return ""
    try:
        found = find_named_file(path.stem, kind, env_var, what)
    except ConfigError:
        return ""
    return f"; the {what} named {path.stem!r} is {found}: give its name without .toml"


def find_named_file(name_or_path: str | os.PathLike, kind: str, env_var: str, what: str | None = None) -> Path:
    """Find a ``kind`` file (``"model"``, ``"experiment"``) given as a path or as a name.

    A path ends in ``.toml`` or is an existing file; anything else is a name (without folders), looked up as
    ``NAME.toml`` in the folders of ``$env_var`` (``os.pathsep`` separated), then ``./<kind>s``
    and, where agrel-sim runs from its checkout (an editable install), the checkout's ``<kind>s/``
    folder (so a run folder named like an experiment does not hide it). ``what`` names the file
    sought in messages (default: ``kind``), where it is one that lives among the ``kind`` files
    (a sweep among the experiments).

    Parameters
    ----------
    name_or_path : str or os.PathLike
        A name, or a path to a ``.toml`` file.
    kind : str
        ``"model"`` or ``"experiment"``: the folders' kind.
    env_var : str
        The environment variable that lists further folders of such files.
    what : str or None
        The file sought, in messages (default: ``kind``).

    Returns
    -------
    Path
        The file found.

    Raises
    ------
    ConfigError
        Listing every path tried, when no file is found for a name; naming the path, for a
        ``.toml`` path that is missing, a folder, a path with folders but without ``.toml``, or
        an ``$env_var`` entry that is not a folder; for an empty name.
    """
    what = what or kind
    a_file = f"{'an' if what[0] in 'aeiou' else 'a'} {what} file"
    if not str(name_or_path).strip():  # Path("") would be the current folder
        raise ConfigError(f"an empty {what} name; give the name of {a_file} or its path (.toml)")
    path = Path(name_or_path)
    if path.suffix == ".toml" or path.is_file():
        if path.is_dir():
            raise ConfigError(f"{path}: is a folder; give the path of {a_file} (.toml)")
        if path.is_symlink() and not path.is_file():
            raise ConfigError(f"{path}: a link that leads to no file (its target is missing, or links loop); point it at {a_file}, or give that file's path")
        if not path.is_file():
            raise ConfigError(f"{path}: {what} file not found" + _named_instead(path, kind, env_var, what))
        return path
    a_folder = f"{path}: is a folder; give the path of {a_file} (.toml), or the name of one"
    if len(path.parts) > 1:  # looked up as a name, it would be found below the search folders, not where it points
        if path.is_dir():
            raise ConfigError(a_folder)
        raise ConfigError(f"{path}: a path without .toml, not a name (names have no folders); give the {what} file's path with its .toml suffix, or its name alone")
    folders = [Path(p) for p in os.environ.get(env_var, "").split(os.pathsep) if p]
    for folder in folders:  # a misspelt folder would otherwise let a file of the same name elsewhere be used
        if not folder.is_dir():
            raise ConfigError(f"{env_var}: {folder} is not a folder; set {env_var} to folders of {kind} files, separated by {os.pathsep!r}")
    folders.append(Path.cwd() / f"{kind}s")
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file():  # agrel-sim runs from its checkout, not from an installed copy in site-packages
        folders.append(checkout / f"{kind}s")
    tried = list(dict.fromkeys(folder / f"{name_or_path}.toml" for folder in folders))  # run in the checkout, two are one
    for candidate in tried:
        if candidate.is_file():
            return candidate
    if path.is_dir():  # looked for after the names: a run folder named like an experiment does not hide it
        raise ConfigError(a_folder)
    listing = "\n  ".join(str(p) for p in tried)
    raise ConfigError(
        f"{what} {str(name_or_path)!r} not found; tried:\n  {listing}\n"
        f"give a path to a .toml file, or set {env_var} to a folder of {kind}s"
    )


class Fields:
    """A view on one TOML table that remembers where it came from.

    Parameters
    ----------
    table : dict
        The parsed table.
    source : str
        The file the table was read from (for messages).
    where : str
        The dotted path of the table inside the file, empty for the top level.
    top_level : tuple of str
        The keys of the file's top level, named as such where one turns up in a table below it
        (placed after a table's header, which TOML reads as a key of that table).
    inside : bool
        Whether ``table`` lies below the file's top level even where ``where`` is empty (a
        table read on its own, such as an experiment's ``[model]``).
    """

    def __init__(self, table: Any, source: str, where: str = "", top_level: tuple[str, ...] = (), inside: bool = False):
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: {where or 'top level'}: expected a table, got {table!r}")
        self.table = table
        self.source = source
        self.where = where
        self.top_level = top_level
        self.inside = inside or bool(where)
        self._used: set[str] = set()

    def name(self, key: str) -> str:
        """The dotted name of ``key`` in the file, as messages give it (``layers[2].kernel_size``).

        Parameters
        ----------
        key : str
            A key of this table.

        Returns
        -------
        str
        """
        return f"{self.where}.{key}" if self.where else key

    def _misspelt(self, key: str) -> str:
        """For a missing ``key``: a clause naming a key of the table spelt much like it, or nothing."""
        close = difflib.get_close_matches(key, [name for name in self.table if isinstance(name, str)], n=1, cutoff=0.75)
        return f" (the {'table' if self.inside else 'file'} has {close[0]!r}: a misspelling of {key!r}?)" if close else ""

    def error(self, key: str, problem: str) -> ConfigError:
        """A :class:`ConfigError` naming the file and the field ``key``, saying ``problem``; the caller raises it.

        Parameters
        ----------
        key : str
            A key of this table.
        problem : str
            What is wrong with it, and what to do.

        Returns
        -------
        ConfigError
        """
        return ConfigError(f"{self.source}: {self.name(key)}: {problem}")

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ..., check=None, hint: str = ""):
        """Return ``table[key]`` checked against ``kind`` (and ``check``), or ``default``.

        Parameters
        ----------
        key : str
            The field.
        kind : type or tuple of type
            What it must be; an integer is taken where a float is, a bool never as a number,
            and no infinite or NaN float at all.
        default : object
            The value of a missing key; without one, the key is required.
        check : callable or None
            A predicate on the value.
        hint : str
            What the field requires, for the message.

        Returns
        -------
        object
            The value (an integer given for a float as a float).

        Raises
        ------
        ConfigError
            Naming the file and the field, for a missing or a bad value.
        """
        self._used.add(key)
        if key not in self.table:
            if default is ...:
                raise self.error(key, f"missing; {hint or 'this field is required'}{self._misspelt(key)}")
            return default
        value = self.table[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        # TOML integers are acceptable where a float is expected; booleans are never numbers.
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            try:
                value = float(value)
            except OverflowError:
                raise self.error(key, f"expected a finite number, got an integer of {len(str(abs(value)))} digits") from None
        if isinstance(value, bool) and bool not in kinds:
            ok = False
        elif isinstance(value, float) and not math.isfinite(value):  # TOML has inf and nan; no setting takes them
            ok = False
        else:
            ok = isinstance(value, kinds)
        if not ok or (check is not None and not check(value)):
            expected = hint or " or ".join(k.__name__ for k in kinds)
            raise self.error(key, f"expected {expected}, got {shown(value, count=int in kinds and float not in kinds)}")
        return value

    def sub(self, key: str, default_empty: bool = True) -> "Fields":
        """Return the sub-table ``key`` as :class:`Fields` (empty if absent and allowed).

        Parameters
        ----------
        key : str
            The sub-table's key.
        default_empty : bool
            Whether a missing sub-table is an empty one (default) or an error.

        Returns
        -------
        Fields
        """
        self._used.add(key)
        if key not in self.table and default_empty:
            return Fields({}, self.source, self.name(key), self.top_level)
        if key not in self.table:
            raise self.error(key, f"missing table{self._misspelt(key)}")
        return Fields(self.table[key], self.source, self.name(key), self.top_level)

    def finish(self) -> None:
        """Raise if the table holds keys that were never read (typos, unsupported settings)."""
        unknown = sorted(set(self.table) - self._used)
        if unknown:
            known = ", ".join(sorted(self._used)) or "none"
            problem = f"unknown field; the fields here are: {known}"
            if self.inside and unknown[0] in self.top_level:
                problem += f"; {unknown[0]} is a key of the top level: move it above the file's first table, as TOML reads a key after a table's header as one of that table"
            raise self.error(unknown[0], problem)
