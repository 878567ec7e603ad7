from django.core.management.base import BaseCommand

from routing.services import ledger_replay
from routing.spool import ledger_spool


class Command(BaseCommand):
    help = (
        "Write the ledger rows spooled while the database was unreachable (idempotent by "
        "request id), or with --list show them and those set aside. A beat task does this "
        "every minute."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--list", dest="show", action="store_true", help="Show what is spooled; write nothing."
        )

    def handle(self, *args, show: bool = False, **options):
        spool = ledger_spool()
        if show:
            for record in spool.records():
                self.stdout.write(_describe(record))
            for aside in spool.rejected():
                self.stdout.write(f"{_describe(aside['record'])} SET ASIDE: {aside['error']}")
            return
        report = spool.replay(ledger_replay)
        self.stdout.write(
            f"{report.applied} written, {report.pending} still waiting for the database "
            f"({report.files} files), {report.rejected} set aside (refused for what they "
            "hold; --list shows them)."
        )
        if report.pending or report.rejected:
            raise SystemExit(1)


def _describe(record: dict) -> str:
    row = record.get("row")
    if not isinstance(row, dict):
        return "a reservation to release"
    return f"{row.get('request_id')} {row.get('status')} {row.get('cost_nanos')}n"
