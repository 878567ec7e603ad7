from django.db import models


class UsageStatus(models.TextChoices):
    OK = "ok", "Answered"
    UPSTREAM_ERROR = "upstream_error", "Every upstream attempt failed"
    CLIENT_CLOSED = "client_closed", "Client disconnected mid-stream"
