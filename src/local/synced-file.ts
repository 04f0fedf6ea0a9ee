import { open } from 'node:fs/promises';

/* Writes a new file and syncs it before closing, so that once renamed into place it is there whole. */
export async function writeSyncedFile(file: string, content: string, mode: number): Promise<void> {
  const handle = await open(file, 'w', mode);
  try {
    await handle.writeFile(content);
    await handle.sync();
  } finally {
    await handle.close();
  }
}

/*
 * Renames are durable only once their directory is synced. They are done and seen by every reader
 * already, so a failing sync does not undo them (only a power loss could): best effort.
 */
export async function syncDirectory(directory: string): Promise<void> {
  const handle = await open(directory, 'r').catch(() => undefined);
  await handle?.sync().catch(() => undefined);
  await handle?.close();
}
