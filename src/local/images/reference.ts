import { ImageError } from './image-store.js';

/*
 * Image references as Docker reads them (distribution's reference grammar):
 * `[registry[:port]/]path[:tag][@sha256:hex]`. The first path component is a registry when it has
 * a dot or a colon or is `localhost`; otherwise the image is on Docker Hub, where a one-component
 * name lives under `library/`. No tag and no digest means `latest`.
 */

export const DOCKER_HUB = 'docker.io';

export interface ImageReference {
  /* `docker.io`, `ghcr.io`, `127.0.0.1:5000`: the key of local.registries. */
  registry: string;
  /* `library/python`, `openhpi/co_execenv_python`. */
  repository: string;
  tag: string | undefined;
  digest: string | undefined;
}

const COMPONENT = /^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$/;
const DOMAIN = /^(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*|\[[0-9a-fA-F:.]+\])(?::[0-9]{1,5})?$/;
const TAG = /^[\w][\w.-]{0,127}$/;
const DIGEST = /^sha256:[0-9a-f]{64}$/;
const MAX_NAME_LENGTH = 255;

function invalid(reference: string, why: string): ImageError {
  return new ImageError('bad-reference', reference, `invalid image reference "${reference}": ${why}`);
}

export function parseReference(text: string): ImageReference {
  const reference = text.trim();
  if (reference === '') throw invalid(text, 'it is empty');
  let rest = reference;
  let digest: string | undefined;
  const at = rest.indexOf('@');
  if (at >= 0) {
    digest = rest.slice(at + 1);
    rest = rest.slice(0, at);
    if (!DIGEST.test(digest)) throw invalid(text, `the digest "${digest}" is not sha256: followed by 64 lower-case hex digits`);
  }
  let tag: string | undefined;
  const lastSlash = rest.lastIndexOf('/');
  const colon = rest.lastIndexOf(':');
  if (colon > lastSlash) {
    tag = rest.slice(colon + 1);
    rest = rest.slice(0, colon);
    if (!TAG.test(tag)) throw invalid(text, `the tag "${tag}" is not 1-128 letters, digits, _ . or - (not starting with . or -)`);
  }
  const components = rest.split('/');
  let registry = DOCKER_HUB;
  const first = components[0] ?? '';
  if (components.length > 1 && (first.includes('.') || first.includes(':') || first === 'localhost')) {
    if (!DOMAIN.test(first)) throw invalid(text, `"${first}" is not a registry host[:port]`);
    registry = first === 'index.docker.io' || first === 'registry-1.docker.io' ? DOCKER_HUB : first;
    components.shift();
  }
  for (const component of components) {
    if (!COMPONENT.test(component)) {
      throw invalid(text, `"${component}" is not a repository name component (lower-case letters, digits, and . _ __ - between them)`);
    }
  }
  if (registry === DOCKER_HUB && components.length === 1) components.unshift('library');
  const repository = components.join('/');
  if (repository.length + registry.length + 1 > MAX_NAME_LENGTH) throw invalid(text, `the name is longer than ${MAX_NAME_LENGTH} characters`);
  if (tag === undefined && digest === undefined) tag = 'latest';
  return { registry, repository, tag, digest };
}

export function formatReference(reference: ImageReference): string {
  return `${reference.registry}/${reference.repository}${reference.tag !== undefined ? `:${reference.tag}` : ''}${reference.digest !== undefined ? `@${reference.digest}` : ''}`;
}
