"""The YAML loader of config files and of ``section.key=value`` words (:mod:`.loader`, :mod:`.overrides`)."""

import yaml


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` refusing a key written twice in one mapping (YAML keeps the last one
    silently, so a second ``lr:`` further down would win unnoticed). Keys merged in with ``<<:``
    may still be overridden: that is what a merge is for."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark)
                except TypeError:   # an unhashable key: the base class says so
                    continue
                if first is not key_node.start_mark:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key!r} appears twice (first on line {first.line + 1}); keep one",
                        key_node.start_mark)
        return super().construct_mapping(node, deep)
