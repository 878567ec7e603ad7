"""What test modules share: fakes of what CascadeFlow talks to (an OpenAI-wire upstream,
Stripe, a budget callback, a broker), servers to run it under, and service checks."""
