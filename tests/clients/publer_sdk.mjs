// A Publer client written the way public SDKs and automation nodes are: the origin is
// hard-coded and only the API key comes from the settings (here PUBLER_API_KEY).
const BASE_URL = "https://app.publer.com/api/v1";

class Publer {
  constructor(apiKey) {
    this.apiKey = apiKey;
  }

  async request(method, path) {
    const response = await fetch(`${BASE_URL}${path}`, {
      method,
      headers: { Authorization: `Bearer-API ${this.apiKey}`, Accept: "application/json" },
    });
    return { status: response.status, body: await response.json() };
  }

  me() {
    return this.request("GET", "/users/me");
  }

  accounts() {
    return this.request("GET", "/accounts");
  }
}

const answer = await new Publer(process.env.PUBLER_API_KEY).accounts();
console.log(JSON.stringify(answer));
