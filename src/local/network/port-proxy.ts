import net from 'node:net';

/*
 * Publishes a runner's TCP port on the host, as Docker's docker-proxy does: a listening socket on
 * `local.hostaddress` with a port the kernel chose, each accepted connection relayed to the
 * runner's address. Chosen over DNAT because DNAT to a runner from 127.0.0.1 (the default host
 * address) needs `route_localnet` on the host's loopback, which lets martian 127/8 packets be
 * routed and weakens every loopback service; a relay needs no host setting, leaves no kernel state
 * behind when the daemon is killed (the socket dies with it), and a free port comes from the
 * kernel, so two runners exposing the same port simply get two host ports. The relay connects from
 * the bridge address; the host's input rules accept the runner's replies as established traffic.
 * TCP only, like Poseidon's Nomad jobs by default.
 */
export class PortProxy {
  private constructor(
    private readonly server: net.Server,
    private readonly sockets: Set<net.Socket>,
    readonly hostPort: number,
  ) {}

  static listen(hostAddress: string, targetAddress: string, targetPort: number): Promise<PortProxy> {
    const sockets = new Set<net.Socket>();
    const server = net.createServer({ allowHalfOpen: true }, (client) => {
      const upstream = net.connect({ host: targetAddress, port: targetPort, allowHalfOpen: true });
      for (const socket of [client, upstream]) {
        sockets.add(socket);
        socket.setNoDelay(true);
        socket.once('close', () => sockets.delete(socket));
        // Either side failing ends both; the peer then sees a reset or an end, as with a direct connection.
        socket.once('error', () => {
          client.destroy();
          upstream.destroy();
        });
      }
      client.pipe(upstream);
      upstream.pipe(client);
      client.once('close', () => upstream.destroy());
      upstream.once('close', () => client.destroy());
    });
    return new Promise((resolve, reject) => {
      server.once('error', reject);
      server.listen({ host: hostAddress, port: 0, exclusive: true }, () => {
        server.off('error', reject);
        server.on('error', () => undefined);
        const address = server.address();
        if (address === null || typeof address === 'string') {
          server.close();
          reject(new Error('the port proxy has no TCP address'));
          return;
        }
        resolve(new PortProxy(server, sockets, address.port));
      });
    });
  }

  /* Stops listening and ends every relayed connection. */
  close(): Promise<void> {
    for (const socket of this.sockets) socket.destroy();
    return new Promise((resolve) => this.server.close(() => resolve()));
  }
}
