from storyexp.utils.resolvers import register_resolvers, wandb_offline

__all__ = ["register_resolvers", "wandb_offline"]
