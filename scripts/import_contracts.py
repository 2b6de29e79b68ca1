"""A custom import-linter contract: a private module is imported only from inside the
package that owns it.

`lint-imports` (in `make check`) loads it from `[tool.importlinter] contract_types`. In
`consumer.kafka._source` the owner is `consumer.kafka`: the package right above the first
name part that starts with `_`. `consumer.kafka._backend` may import it; `consumer.runtime`
or `jobstream` must use `consumer.kafka`'s public names. import-linter's wildcards match
whole name parts only, so the built-in contracts cannot say this.
"""

from __future__ import annotations

from grimp import ImportGraph
from importlinter import Contract, ContractCheck, fields, output


def _owner(module: str) -> str | None:
    """The package owning `module` when it is private (None when it is public)."""
    parts = module.split(".")
    for index, part in enumerate(parts):
        if part.startswith("_"):
            return ".".join(parts[:index])
    return None


class PublicNamesContract(Contract):
    """Modules in `importers` (packages) import private modules of the `root_packages`
    only from inside their owning package."""

    type_name = "public_names"

    importers = fields.ListField(subfield=fields.StringField())

    def check(self, graph: ImportGraph, verbose: bool) -> ContractCheck:
        roots = {str(root) for root in self.session_options["root_packages"]}
        broken: list[str] = []
        for package in self.importers:  # type: ignore[attr-defined]
            for importer in sorted({package, *graph.find_descendants(package)}):
                for imported in sorted(graph.find_modules_directly_imported_by(importer)):
                    owner = _owner(imported)
                    inside = owner is not None and (
                        importer == owner or importer.startswith(owner + ".")
                    )
                    if imported.split(".")[0] in roots and owner is not None and not inside:
                        details = graph.get_import_details(importer=importer, imported=imported)
                        lines = ", ".join(str(d["line_number"]) for d in details)
                        broken.append(f"{importer} -> {imported} (l. {lines})")
        return ContractCheck(kept=not broken, metadata={"broken": broken})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for line in check.metadata["broken"]:
            output.print_error(f"- {line}: import the package's public name instead")
