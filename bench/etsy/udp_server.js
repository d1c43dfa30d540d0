/*
 * A statsd (Etsy) server module for the benchmark: UDP like the stock
 * servers/udp.js, plus two things the stock one cannot do:
 *   - ask for a kernel receive buffer (config.recvBufferSize), so Etsy gets
 *     the same buffer as our daemon;
 *   - bind port 0 and print the port it got, so runs never collide.
 * statsd loads it through the `servers: [{server: PATH, ...}]` setting.
 */
'use strict';

const dgram = require('dgram');

exports.start = function (config, callback) {
  const options = { type: config.address_ipv6 ? 'udp6' : 'udp4' };
  if (config.recvBufferSize) {
    options.recvBufferSize = config.recvBufferSize;
  }
  const server = dgram.createSocket(options, callback);
  server.on('listening', () => {
    const address = server.address();
    // The runner waits for this line (the same word our daemon logs).
    console.log(
      'bench-udp-server ready udp=' + address.address + ':' + address.port +
      ' rcvbuf=' + server.getRecvBufferSize()
    );
  });
  server.bind(Number(config.port) || 0, config.address || '127.0.0.1');
  this.server = server;
  return true;
};
