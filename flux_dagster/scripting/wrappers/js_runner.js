// Runs a user's JavaScript inside the sandbox, as the code-executor-js Lambda does (vm context).
// argv[2] is the event file {script, variables, outputLimit}. The script gets its variables as
// globals, setResult(value) and console.log/warn/error. Its result is setResult's value, else the
// value of the last expression (awaited when it is a promise), else null. The last stdout line
// is `MARKER {result, console, error}`. The vm is not the security boundary: the sandbox is.
'use strict';

const fs = require('fs');
const util = require('util');
const vm = require('vm');

const MARKER = '\x1eflux-script-response ';

class OutputLimitExceeded extends Error {}

function jsonText(value) {
  try {
    const text = JSON.stringify(value === undefined ? null : value);
    return text === undefined ? 'null' : text; // a function or a symbol
  } catch (err) { // BigInt, circular structures
    return JSON.stringify(String(value));
  }
}

async function main() {
  const event = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
  const limit = event.outputLimit;
  const lines = [];
  let size = 0;
  let overflowed = false;
  const record = (prefix, args) => {
    const line = prefix + util.format(...args);
    size += Buffer.byteLength(line) + 1;
    if (overflowed || size > limit) {
      overflowed = true;
      throw new OutputLimitExceeded('output limit exceeded');
    }
    lines.push(line);
  };
  const log = (...args) => record('', args);
  const sandboxConsole = {
    log, info: log, debug: log,
    warn: (...args) => record('[WARN] ', args),
    error: (...args) => record('[ERROR] ', args),
  };

  let result = null;
  let resultSet = false;
  const context = {};
  for (const variable of event.variables || []) {
    if (variable && typeof variable.name === 'string' && variable.name) context[variable.name] = variable.value;
  }
  Object.assign(context, {
    console: sandboxConsole,
    setResult: (value) => { result = value; resultSet = true; },
  });
  vm.createContext(context);

  let error = null;
  try {
    let last = vm.runInContext(event.script, context, { filename: 'script.js' });
    if (last && typeof last.then === 'function') last = await last;
    if (!resultSet && last !== undefined) result = last;
  } catch (err) {
    if (!overflowed) error = err && err.stack ? String(err.stack) : String(err);
  }
  if (overflowed) error = `The script's console output exceeded the ${limit}-byte limit`;
  let resultJson = jsonText(result);
  if (Buffer.byteLength(resultJson) > limit) {
    resultJson = 'null';
    error = `The script's result exceeded the ${limit}-byte limit`;
  }
  const line = `{"result": ${resultJson}, "console": ${JSON.stringify(lines)}, "error": ${JSON.stringify(error)}}`;
  fs.writeSync(1, '\n' + MARKER + line + '\n');
  process.exit(0); // timers or handles the script may have reached must not keep it alive
}

main();
