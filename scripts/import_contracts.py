"""A custom import-linter contract: importers use other packages' public names only.

`lint-imports` (in `make check`) loads it from `[tool.importlinter] contract_types`. A
module is private when any part of its dotted name starts with `_` (`consumer._run`,
`consumer.kafka._source`); importing one from outside its own top-level package breaks the
contract. import-linter's wildcards match whole name parts only, so the built-in
contracts cannot say this.
"""

from __future__ import annotations

from grimp import ImportGraph
from importlinter import Contract, ContractCheck, fields, output


def _private(module: str) -> bool:
    return any(part.startswith("_") for part in module.split("."))


class PublicNamesContract(Contract):
    """`importers` (packages) import nothing private from the `root_packages`."""

    type_name = "public_names"

    importers = fields.ListField(subfield=fields.StringField())

    def check(self, graph: ImportGraph, verbose: bool) -> ContractCheck:
        roots = {str(root) for root in self.session_options["root_packages"]}
        broken: list[str] = []
        for package in self.importers:  # type: ignore[attr-defined]
            for importer in sorted({package, *graph.find_descendants(package)}):
                own = importer.split(".")[0]
                for imported in sorted(graph.find_modules_directly_imported_by(importer)):
                    top = imported.split(".")[0]
                    if top in roots and top != own and _private(imported):
                        details = graph.get_import_details(importer=importer, imported=imported)
                        lines = ", ".join(str(d["line_number"]) for d in details)
                        broken.append(f"{importer} -> {imported} (l. {lines})")
        return ContractCheck(kept=not broken, metadata={"broken": broken})

    def render_broken_contract(self, check: ContractCheck) -> None:
        for line in check.metadata["broken"]:
            output.print_error(f"- {line}: import the package's public name instead")
