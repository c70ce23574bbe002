"""``validate``: every rule of the spec against one or more files; returns findings, prints nothing."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ..errors import LoraToolError
from ..rules import Finding

ADAPTER_SUFFIXES = (".safetensors", ".gguf")


@dataclass
class FileReport:
    path: str
    source_format: str | None
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(f.is_error for f in self.findings)

    def to_dict(self) -> dict:
        return {"path": self.path, "source_format": self.source_format, "valid": self.ok,
                "findings": [f.to_dict() for f in self.findings]}


@dataclass
class ValidationReport:
    files: list[FileReport]

    @property
    def ok(self) -> bool:
        """True when no file breaks a MUST rule (SHOULD findings are warnings)."""
        return all(f.ok for f in self.files)

    @property
    def findings(self) -> list[Finding]:
        return [f for r in self.files for f in r.findings]

    def to_dict(self) -> dict:
        errors = sum(f.is_error for f in self.findings)
        return {"valid": self.ok, "files": [r.to_dict() for r in self.files],
                "summary": {"files": len(self.files), "errors": errors,
                            "warnings": len(self.findings) - errors}}


def expand_paths(paths, empty: list | None = None) -> list[str]:
    """Files and PEFT directories to validate; a plain directory yields every adapter in it.

    Directories that hold no adapter at all are appended to ``empty`` when it is given.
    """
    out: list[str] = []
    for p in paths:
        p = os.fspath(p)
        if os.path.isdir(p) and not os.path.exists(os.path.join(p, "adapter_config.json")):
            found = []
            for root, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                if "adapter_config.json" in files:
                    found.append(root)
                    dirs[:] = []
                    continue
                found.extend(os.path.join(root, f) for f in sorted(files)
                             if f.endswith(ADAPTER_SUFFIXES))
            out.extend(sorted(found))
            if not found and empty is not None:
                empty.append(p)
        else:
            out.append(p)
    return out


def validate(paths: str | os.PathLike | list, *, data: bool = True, **options
             ) -> ValidationReport:
    """Check files against every rule of the spec.

    ``paths`` is one path or a list; a directory stands for every adapter below it. With
    ``data`` (the default) tensor values are scanned too: NaN/Inf, all-zero B, the integrity
    hash. torch is never imported.

    >>> validate("examples/adapter.safetensors").ok
    True
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    empty: list[str] = []
    files = [_validate_one(p, data, options) for p in expand_paths(paths, empty)]
    # An empty directory passing silently would hide a misconfigured CI job.
    files += [FileReport(d, None, [Finding("LT506", "directory holds no adapter (no "
                                                    "*.safetensors file, no adapter_config.json)",
                                           d)]) for d in empty]
    return ValidationReport(files)


def _validate_one(path: str, data: bool, options: dict) -> FileReport:
    from ..interop import detect_format, get_format
    from ..interop.base import ReaderOptions
    report = FileReport(path, None)
    try:
        opts = ReaderOptions.of(**options)
        if not os.path.exists(path):
            raise LoraToolError("no such file or directory", code="LT001", path=path)
        fmt = opts.source_format or detect_format(path)
        report.source_format = fmt
        # A foreign adapter is valid when it reads into the canonical model without error.
        report.findings.extend(get_format(fmt).validate(path, opts, data=data))
    except LoraToolError as e:
        report.findings.append(Finding(e.code, e.message, path, e.module))
    return report
