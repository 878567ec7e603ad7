from django.urls import path, re_path

from routing import views

app_name = "routing"

urlpatterns = [
    path("chat/completions", views.chat_completions, name="chat-completions"),
    path("models", views.models, name="models"),
    path("models/<path:model_id>", views.model, name="model"),
    path("responses", views.create_response, name="responses"),
    path("embeddings", views.create_embeddings, name="embeddings"),
    re_path(r"^(?P<path>.*)$", views.not_found, name="not-found"),
]
