#!/usr/bin/env python
import os
import sys


def main() -> None:
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "cascadeflow_site.settings")
    from django.conf import settings  # noqa: PLC0415 - settings load only after DJANGO_SETTINGS_MODULE is set
    from django.core.exceptions import ImproperlyConfigured  # noqa: PLC0415 - settings load only after DJANGO_SETTINGS_MODULE is set
    from django.core.management import execute_from_command_line  # noqa: PLC0415 - settings load only after DJANGO_SETTINGS_MODULE is set

    try:
        settings.INSTALLED_APPS  # noqa: B018 - load the settings: their error, not a later one
    except ImproperlyConfigured as exc:
        sys.exit(f"CascadeFlow's settings cannot load (ImproperlyConfigured): {exc}")
    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
