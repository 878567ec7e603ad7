from django.core.management.base import BaseCommand

from routing.services import ledger_replay
from routing.spool import ledger_spool


class Command(BaseCommand):
    help = (
        "Write the ledger rows spooled while the database was unreachable (idempotent by "
        "request id), or with --list show them. A beat task does this every minute."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--list", dest="show", action="store_true", help="Show what is spooled; write nothing."
        )

    def handle(self, *args, show: bool = False, **options):
        spool = ledger_spool()
        if show:
            for record in spool.records():
                row = record["row"]
                self.stdout.write(f"{row['request_id']} {row['status']} {row['cost_nanos']}n")
            return
        report = spool.replay(ledger_replay)
        self.stdout.write(
            f"{report.applied} written, {report.pending} still waiting for the database "
            f"({report.files} files)."
        )
        if report.pending:
            raise SystemExit(1)
