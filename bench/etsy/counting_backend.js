/*
 * A statsd (Etsy) backend for the benchmark: no network, it only counts.
 *
 * On every flush it adds up the counters whose name starts with the
 * configured prefix (config.benchCounting.prefix, default "bench.") and
 * writes the running totals, as JSON, to config.benchCounting.file
 * (written to a temporary file and renamed, so a reader never sees half).
 */
'use strict';

const fs = require('fs');

function CountingBackend(config, events) {
  const options = config.benchCounting || {};
  this.prefix = options.prefix || 'bench.';
  this.file = options.file;
  this.total = 0;
  this.flushes = 0;
  events.on('flush', (timestamp, metrics) => this.flush(timestamp, metrics));
}

CountingBackend.prototype.flush = function (timestamp, metrics) {
  let windowSum = 0;
  let counterKeys = 0;
  for (const key of Object.keys(metrics.counters)) {
    if (key.startsWith(this.prefix)) {
      windowSum += metrics.counters[key];
      counterKeys += 1;
    }
  }
  const count = (table) => Object.keys(table).filter((k) => k.startsWith(this.prefix)).length;
  this.total += windowSum;
  this.flushes += 1;
  const report = {
    flushes: this.flushes,
    flushed_at: Date.now() / 1000,
    timestamp: timestamp,
    total: this.total,
    window: windowSum,
    series: counterKeys + count(metrics.timers) + count(metrics.gauges) + count(metrics.sets),
  };
  if (this.file) {
    const tmp = this.file + '.tmp';
    fs.writeFileSync(tmp, JSON.stringify(report));
    fs.renameSync(tmp, this.file);
  }
};

exports.init = function (startupTime, config, events) {
  new CountingBackend(config, events);
  return true;
};
