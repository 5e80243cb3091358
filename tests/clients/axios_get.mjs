// axios, unchanged, GET of one Publer URL (argv[2]); HTTPS_PROXY from the environment.
// argv[3] names the package: "axios" (1.16.1 and later tunnel with CONNECT) or
// "axios-plain-text" (axios 1.16.0, which sends the proxy `GET https://...` in plain text).
const { default: axios } = await import(process.argv[3] || "axios");

const headers = process.env.PUBLER_API_KEY
  ? { Authorization: `Bearer-API ${process.env.PUBLER_API_KEY}` }
  : {};
const response = await axios.get(process.argv[2], { headers, validateStatus: () => true });
console.log(JSON.stringify({ status: response.status, body: JSON.stringify(response.data) }));
