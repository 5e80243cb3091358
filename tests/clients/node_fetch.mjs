// Plain fetch of one Publer URL given on the command line, with the headers of argv[3] (JSON).
const response = await fetch(process.argv[2], { headers: JSON.parse(process.argv[3] || "{}") });
console.log(JSON.stringify({ status: response.status, body: await response.text() }));
