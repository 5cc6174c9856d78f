#!/usr/bin/env python3
"""Validate a Docker Compose file without a Docker engine.

Usage: python3 .ci/check-compose.py [docker-compose.yml]

1. Loads the YAML with PyYAML (yaml.safe_load).
2. Validates it against the official Compose specification schema,
   .ci/compose-spec.json (from compose-spec/compose-spec, schema/compose-spec.json),
   using the validator class named by the schema's "$schema".
3. Cross-checks what the schema cannot express:
   - every service named in a depends_on (list or mapping form) exists;
   - every named volume used in a service's volumes is declared top-level;
   - every service has an image or a build, and a build's context /
     dockerfile exists relative to the compose file;
   - every image has an explicit tag (or digest) that is not "latest".

Exit status 0 with "compose: OK (N services)" when all is well; otherwise
every problem is printed on its own line and the exit status is 1.
"""

import json
import os
import re
import sys

MISSING = []
try:
    import yaml
except ImportError:
    MISSING.append("pyyaml")
try:
    import jsonschema
    import jsonschema.validators
except ImportError:
    MISSING.append("jsonschema")

HERE = os.path.dirname(os.path.abspath(__file__))
SCHEMA_PATH = os.path.join(HERE, "compose-spec.json")
DEFAULT_COMPOSE = os.path.join(os.path.dirname(HERE), "docker-compose.yml")



def dockerfile_stages(path):
    """The stage names a Dockerfile declares (`FROM image AS name`)."""
    stages = set()
    with open(path, encoding="utf-8") as f:
        for line in f:
            words = line.split()
            if len(words) >= 4 and words[0].upper() == "FROM" and words[-2].upper() == "AS":
                stages.add(words[-1])
    return stages

def fmt_path(parts):
    """Render a jsonschema error path like services.tests.depends_on[0]."""
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += "[%d]" % p
        else:
            out += ("." if out else "") + str(p)
    return out or "(top level)"


def schema_errors(doc, schema):
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    validator = cls(schema)
    problems = []
    errors = sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))
    for err in errors:
        # For oneOf/anyOf failures, the most relevant sub-error is more helpful.
        best = jsonschema.exceptions.best_match([err])
        where = fmt_path(best.absolute_path)
        if best.validator == "additionalProperties" and isinstance(best.instance, dict):
            for key in unexpected_keys(best.instance, best.schema):
                problems.append(
                    "schema: %s: unknown property %r (not allowed by the Compose specification)"
                    % (where, key)
                )
            continue
        problems.append("schema: %s: %s" % (where, best.message))
    return problems


def unexpected_keys(instance, schema):
    """Keys of instance allowed by neither properties nor patternProperties."""
    props = schema.get("properties", {})
    patterns = [re.compile(p) for p in schema.get("patternProperties", {})]
    return [
        k for k in instance
        if k not in props and not any(p.search(str(k)) for p in patterns)
    ]


def split_image(image):
    """Return (name, tag, digest) for an image reference."""
    digest = None
    if "@" in image:
        image, digest = image.split("@", 1)
    last = image.rsplit("/", 1)[-1]  # a ':' before the last '/' is a registry port
    tag = None
    if ":" in last:
        tag = last.rsplit(":", 1)[1]
        image = image[: len(image) - len(tag) - 1]
    return image, tag, digest


def volume_source(entry):
    """Source of a service volume entry and whether it is a named volume."""
    if isinstance(entry, dict):
        vtype = entry.get("type")
        src = entry.get("source")
        return src, (vtype == "volume" and bool(src))
    if isinstance(entry, str):
        parts = entry.split(":")
        if len(parts) < 2:
            return None, False  # anonymous volume: just a container path
        src = parts[0]
        # Bind mounts are paths (absolute, relative, home, or variables).
        if src.startswith(("/", ".", "~", "$")) or "/" in src or "\\" in src:
            return src, False
        return src, True
    return None, False


def semantic_errors(doc, compose_dir):
    problems = []
    services = doc.get("services") or {}
    if not isinstance(services, dict):
        return problems  # already reported by the schema
    declared_volumes = doc.get("volumes") or {}
    if not isinstance(declared_volumes, dict):
        declared_volumes = {}

    for name, svc in services.items():
        if not isinstance(svc, dict):
            continue

        # depends_on
        deps = svc.get("depends_on")
        dep_names = []
        if isinstance(deps, list):
            dep_names = [d for d in deps if isinstance(d, str)]
        elif isinstance(deps, dict):
            dep_names = list(deps.keys())
        for dep in dep_names:
            if dep not in services:
                problems.append(
                    "service %r: depends_on names service %r, which is not defined" % (name, dep)
                )

        # named volumes
        for vol in svc.get("volumes") or []:
            src, named = volume_source(vol)
            if named and src not in declared_volumes:
                problems.append(
                    "service %r: named volume %r is not declared under top-level 'volumes:'"
                    % (name, src)
                )

        # image or build
        image = svc.get("image")
        build = svc.get("build")
        if image is None and build is None:
            problems.append("service %r: has neither 'image' nor 'build'" % name)

        if build is not None:
            if isinstance(build, str):
                context, dockerfile = build, None
            elif isinstance(build, dict):
                context, dockerfile = build.get("context", "."), build.get("dockerfile")
            else:
                context, dockerfile = None, None
            if isinstance(context, str) and "://" not in context and not context.startswith("git@"):
                ctx_path = os.path.normpath(os.path.join(compose_dir, context))
                if not os.path.isdir(ctx_path):
                    problems.append(
                        "service %r: build context %r does not exist (looked for %s)"
                        % (name, context, ctx_path)
                    )
                else:
                    df = dockerfile if isinstance(dockerfile, str) else "Dockerfile"
                    df_path = os.path.normpath(os.path.join(ctx_path, df))
                    if not os.path.isfile(df_path):
                        problems.append(
                            "service %r: dockerfile %r does not exist (looked for %s)"
                            % (name, df, df_path)
                        )
                    else:
                        target = build.get("target") if isinstance(build, dict) else None
                        stages = dockerfile_stages(df_path)
                        if isinstance(target, str) and target not in stages:
                            problems.append(
                                "service %r: build target %r is not a stage of %s (stages: %s)"
                                % (name, target, df, ", ".join(sorted(stages)) or "none")
                            )

        if isinstance(image, str):
            _, tag, digest = split_image(image)
            if digest is None and tag is None:
                problems.append(
                    "service %r: image %r has no explicit tag (pin a version, e.g. %s:<version>)"
                    % (name, image, image)
                )
            elif tag == "latest":
                problems.append(
                    "service %r: image %r uses the 'latest' tag; pin a version instead"
                    % (name, image)
                )

    return problems


def main(argv):
    if MISSING:
        print(
            "check-compose: missing Python package(s): %s (pip install pyyaml jsonschema)"
            % ", ".join(MISSING),
            file=sys.stderr,
        )
        return 1

    if len(argv) > 2:
        print("usage: python3 .ci/check-compose.py [docker-compose.yml]", file=sys.stderr)
        return 1
    path = argv[1] if len(argv) == 2 else DEFAULT_COMPOSE

    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except OSError as e:
        print("%s: cannot read: %s" % (path, e))
        return 1
    except yaml.YAMLError as e:
        print("%s: invalid YAML: %s" % (path, e))
        return 1

    try:
        with open(SCHEMA_PATH, encoding="utf-8") as f:
            schema = json.load(f)
    except (OSError, ValueError) as e:
        print("%s: cannot load schema: %s" % (SCHEMA_PATH, e))
        return 1

    if not isinstance(doc, dict):
        print("%s: top level must be a mapping, got %s" % (path, type(doc).__name__))
        return 1

    problems = schema_errors(doc, schema)
    problems += semantic_errors(doc, os.path.dirname(os.path.abspath(path)))

    if problems:
        for p in problems:
            print("%s: %s" % (path, p))
        return 1

    services = doc.get("services") or {}
    print("compose: OK (%d services)" % len(services))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
