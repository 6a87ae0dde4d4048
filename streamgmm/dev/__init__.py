"""Development only, never imported by the product: embedded broker, synthetic streams, demo."""
