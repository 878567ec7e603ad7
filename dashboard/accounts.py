"""Self-serve sign-up: a new user, their tenant, and the free plan."""

from django.http import Http404


def signup(request):
    raise Http404
