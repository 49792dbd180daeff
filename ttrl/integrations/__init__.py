"""Adapters that bring ttrl's pieces to other training libraries (`ttrl.integrations.trl`)."""
